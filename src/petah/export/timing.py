"""Side-by-side timing: the median of interleaved runs, and ONNX Runtime sessions set up for it.

The export (``--int8 auto`` checks int8 is faster), the pruning policy (each probe's saving) and
the benchmarks time variants the same way: after a warm-up the variants run round-robin
``repeats`` times and the median of each is kept, so drift of the machine hits all alike. It lives
here, below the benchmarks, because library code never imports ``petah.bench``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved_medians(variants: dict[str, Callable[[], object]], repeats: int, warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of each variant, run round-robin on the same inputs."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for key, fn in variants.items():
            start = time.perf_counter()
            fn()
            samples[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in samples.items()}


def ort_session(model: str | bytes):
    """An ONNX Runtime CPU session set up for fair side-by-side timing."""
    import onnxruntime as ort
    import torch

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # ORT's worker threads spin after a run and would steal the cores from the next torch call
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.intra_op_num_threads = torch.get_num_threads()
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def ort_medians(graphs: dict[str, bytes], x, repeats: int) -> dict[str, float]:
    """Median seconds per run of each ONNX graph on input ``x`` (a numpy batch), sessions timed
    round-robin in one run."""
    from petah.runtime.onnx import INPUT

    sessions = {name: ort_session(graph) for name, graph in graphs.items()}
    return interleaved_medians({name: (lambda s=s: s.run(None, {INPUT: x})) for name, s in sessions.items()}, repeats)


__all__ = ["interleaved_medians", "ort_medians", "ort_session"]
