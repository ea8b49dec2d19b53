"""int8 export: ONNX Runtime static quantization (QDQ) of a task's merged graph, calibrated on
the task's own images.

What is quantized: the weights of ``Conv`` (not grouped / depthwise), ``MatMul`` and ``Gemm``
nodes (int8, per output channel) and their input activations (uint8, per tensor, MinMax on the
calibration images). Depthwise convs stay float: with them int8, efficientformerv2_s0 at 224 px
ran 8.4 ms vs 5.4 ms without (ORT 1.32, this CPU). Everything else stays float as well:
LayerNorm, Softmax, the attention-bias adds, GELU / HardSwish, the residual adds — the operations
the hybrid-ViT quantization studies (Q-HyViT and others) find fragile, and the cheap ones where
int8 saves nothing. The graph's metadata records what stayed float.

``mode="auto"`` then checks the result on the task's validation images and on this CPU: where
int8 costs more than ``tolerance`` points of the task metric, the layers whose int8 weights lose
most (lowest SQNR) go back to float, a tenth at a time; where the int8 graph is not faster than the
float one, the float graph is written, and the result says why.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from petah.errors import PetahError
from petah.export.timing import ort_medians, ort_session
from petah.runtime.onnx import INPUT

QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")
MODES = ("always", "auto")
TOLERANCE = {"classification": 1.0, "segmentation": 1.5, "detection": 2.0,  # points of the primary metric
             "anomaly": 1.0}  # image AUROC points
CALIBRATION_BATCH = 8


@dataclass
class Int8Report:
    mode: str
    quantized: bool  # False: auto kept the float graph
    quantized_nodes: int
    float_nodes: list[str]  # quantizable nodes auto sent back to float
    float_op_types: list[str]  # op types never quantized
    calibration_images: int
    metric: str | None = None
    float_score: float | None = None
    int8_score: float | None = None
    float_ms: float | None = None
    int8_ms: float | None = None
    reason: str = ""
    steps: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class OrtModule(nn.Module):
    """An ONNX Runtime session behind the ``model(batch)`` call the task kinds evaluate."""

    def __init__(self, session, head: nn.Module):
        super().__init__()
        self.session, self.head = session, head
        self._device = nn.Parameter(torch.zeros(1), requires_grad=False)  # evaluate() asks for a device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {INPUT: x.numpy()})[0])


def batches(kind, data, preprocess, batch_size: int, limit: int | None = None) -> list[np.ndarray]:
    """Preprocessed image batches of a dataset, as the exported graph takes them."""
    view = kind.view(data, preprocess)
    loader = DataLoader(view, batch_size=batch_size, shuffle=False, collate_fn=getattr(view, "collate", None))
    out, count = [], 0
    for batch in loader:  # images first, whatever the task kind's targets
        images = batch[0]
        out.append(images.numpy())
        count += len(images)
        if limit is not None and count >= limit:
            break
    return out


def quantize(graph: bytes, calibration: list[np.ndarray], exclude: tuple[str, ...] = ()) -> bytes:
    """The QDQ int8 graph (see the module doc) calibrated on ``calibration`` batches."""
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # the calibration sessions warn once per overridable adapter tensor (a base graph's design)
    ort.set_default_logger_severity(3)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(calibration)

        def get_next(self):
            item = next(self.items, None)
            return None if item is None else {INPUT: item}

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        (folder / "float.onnx").write_bytes(graph)
        # symbolic shape inference fails on these graphs (attention reshapes); ONNX's own is enough
        quant_pre_process(str(folder / "float.onnx"), str(folder / "pre.onnx"), skip_symbolic_shape=True)
        # reduce_range: 7-bit weights, ONNX Runtime's advice for its u8s8 kernels on x86 CPUs without
        # VNNI (they saturate); the device's CPU is not known here. On an AVX2-only EPYC the demo
        # digits task lost 1.11 points in int8 without it, 0.28 with it (digit-boxes 0.57 / 0.39 mAP)
        quantize_static(str(folder / "pre.onnx"), str(folder / "int8.onnx"), Reader(),
                        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, op_types_to_quantize=list(QUANTIZED_OPS),
                        nodes_to_exclude=list(exclude) + grouped_convs(graph),
                        calibrate_method=CalibrationMethod.MinMax, reduce_range=True)
        return (folder / "int8.onnx").read_bytes()


def grouped(node) -> bool:
    return node.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in node.attribute)


def quantizable_nodes(graph: bytes) -> list[str]:
    import onnx

    return [n.name for n in onnx.load_from_string(graph).graph.node if n.op_type in QUANTIZED_OPS and not grouped(n)]


def grouped_convs(graph: bytes) -> list[str]:
    import onnx

    return [n.name for n in onnx.load_from_string(graph).graph.node if grouped(n)]


def float_op_types(graph: bytes) -> list[str]:
    import onnx

    nodes = onnx.load_from_string(graph).graph.node
    return sorted({n.op_type for n in nodes} - set(QUANTIZED_OPS)) + (["Conv (grouped)"] if any(map(grouped, nodes))
                                                                       else [])


def weight_sqnr(graph: bytes, nodes: list[str]) -> dict[str, float]:
    """Per node: the SQNR (dB) of its weight under per-channel symmetric int8, as ORT quantizes it;
    low = int8 loses much of that layer."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(graph)
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    wanted = set(nodes)
    result = {}
    for node in model.graph.node:
        if node.name not in wanted:
            continue
        weight = next((weights[i] for i in node.input[1:2] if i in weights), None)
        if weight is None or weight.ndim < 2:
            result[node.name] = float("inf")
            continue
        axis = 0 if node.op_type == "Conv" else weight.ndim - 1
        moved = np.moveaxis(weight.astype(np.float64), axis, 0).reshape(weight.shape[axis], -1)
        scale = np.abs(moved).max(axis=1, keepdims=True) / 127 + 1e-12
        error = moved - np.round(moved / scale) * scale
        result[node.name] = float(10 * np.log10((moved ** 2).sum() / max((error ** 2).sum(), 1e-30)))
    return result


def score(graph: bytes, head: nn.Module, kind, val_batches: list[tuple], classes: list[str]) -> float:
    metrics = kind.evaluate(OrtModule(ort_session(graph), head), val_batches, classes)
    return 100 * float(metrics[kind.primary_metric])


def latency_ms(graphs: dict[str, bytes], x: np.ndarray, repeats: int = 40) -> dict[str, float]:
    """Median batch latency of each graph on this CPU, runs interleaved."""
    return {name: 1000 * seconds for name, seconds in ort_medians(graphs, x, repeats).items()}


def int8_graph(graph: bytes, head: nn.Module, kind, calibration: list[np.ndarray], *, mode: str = "always",
               validation: list[tuple] | None = None, classes: list[str] | None = None,
               tolerance: float | None = None) -> tuple[bytes, Int8Report]:
    """Quantize a merged task graph; ``auto`` checks (and falls back, see the module doc)."""
    if mode not in MODES:
        raise PetahError(f"--int8 takes {' | '.join(MODES)}, got {mode!r}")
    if not calibration:
        raise PetahError("int8 export needs calibration images (--data)")
    nodes = quantizable_nodes(graph)
    quantized = quantize(graph, calibration)
    report = Int8Report(mode, True, len(nodes), [], float_op_types(graph), sum(len(b) for b in calibration))
    if mode == "always":
        return quantized, report
    if not validation:
        raise PetahError("--int8 auto needs validation images (the --data set's validation part)")
    tolerance = TOLERANCE[kind.kind] if tolerance is None else tolerance
    report.metric = kind.primary_metric
    report.float_score = score(graph, head, kind, validation, classes)
    sqnr = weight_sqnr(graph, nodes)
    order = sorted(nodes, key=lambda n: sqnr[n])  # the layers int8 hurts most first
    excluded: list[str] = []
    step = max(1, len(nodes) // 10)
    while True:
        report.int8_score = score(quantized, head, kind, validation, classes)
        report.steps.append({"float_nodes": len(excluded), "score": round(report.int8_score, 3)})
        if report.float_score - report.int8_score <= tolerance or len(excluded) >= len(nodes):
            break
        excluded = order[:len(excluded) + step]
        quantized = quantize(graph, calibration, tuple(excluded))
    report.float_nodes = excluded
    timing = latency_ms({"float": graph, "int8": quantized}, calibration[0][:1])
    report.float_ms, report.int8_ms = round(timing["float"], 4), round(timing["int8"], 4)
    if report.float_score - report.int8_score > tolerance:
        report.quantized, report.reason = False, (f"int8 lost {report.float_score - report.int8_score:.2f} "
                                                  f"{kind.primary_metric} points even with every layer float")
    elif timing["int8"] >= timing["float"]:
        report.quantized, report.reason = False, (f"int8 is not faster on this CPU ({timing['int8']:.3f} vs "
                                                  f"{timing['float']:.3f} ms a batch of 1)")
    else:
        report.reason = (f"int8 within {tolerance:g} points and {timing['float'] / timing['int8']:.2f}x faster"
                         + (f", {len(excluded)} of {len(nodes)} layers kept float" if excluded else ""))
    return (quantized if report.quantized else graph), report


__all__ = ["MODES", "QUANTIZED_OPS", "TOLERANCE", "Int8Report", "OrtModule", "batches", "int8_graph",
           "latency_ms", "quantize", "weight_sqnr"]
