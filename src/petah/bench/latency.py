"""`petah bench latency`: side-by-side latencies in one run (ratios, not timed unit tests).

Every variant sees the same input; after a warm-up, the variants run interleaved (round-robin)
``repeats`` times and the median of each is reported, so drift of the machine hits all alike.
Task packages are synthesised on the backbone with random non-zero adapters: latency does not
depend on the values, and the bench then needs no training and no data.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from petah.backbones import create_backbone
from petah.export.timing import interleaved_medians, ort_session
from petah.packages import write_package
from petah.plans import PlanConfig
from petah.runtime import Runtime
from petah.testing import synthetic_package


def resident_bytes(runtime: Runtime) -> int:
    """Bytes of every tensor the runtime keeps: the model (with all adapters), heads, task norms."""
    model = runtime.backbone.model
    tensors = list(model.parameters()) + list(model.buffers())
    for task in runtime.tasks.values():
        tensors += list(task.head.parameters()) + list(task.overrides.values())
    return sum(t.numel() * t.element_size() for t in tensors)


def run_latency(name: str = "efficientformerv2_s0", img_size: int = 224, batch: int = 1, repeats: int = 20,
                trunk_stages: int = 3, weights: str = "none") -> dict:
    import onnxruntime as ort

    from petah.export import export_base_and_adapters, export_merged
    from petah.runtime.onnx import INPUT, to_onnx_bytes

    torch.manual_seed(0)
    backbone = create_backbone(name, img_size, weights)
    x = torch.randn(batch, 3, img_size, img_size)
    feed = {INPUT: x.numpy()}
    full = synthetic_package(backbone, "task0", PlanConfig())
    late_plan = PlanConfig(stage_ranks={s: 0 for s in range(trunk_stages)})
    late = [synthetic_package(backbone, f"late{i}", late_plan, seed=i + 1) for i in range(4)]

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pkg_path = tmp / "task0.petah"
        write_package(pkg_path, full)
        plain_onnx = ort_session(to_onnx_bytes(backbone.model, x, name))
        merged_onnx = ort_session(str(export_merged(backbone, full, tmp / "merged.onnx").path))
        base = export_base_and_adapters(backbone, [pkg_path], tmp / "ort")
        base_session = ort_session(str(base.base_path))
        lora = ort.LoraAdapter()
        lora.Load(base.tasks[0]["adapter"])
        run_options = ort.RunOptions()
        run_options.add_active_adapter(lora)

        unmerged = Runtime(backbone)
        unmerged.load(full)
        merged = Runtime(backbone, mode="merged")
        merged.load(full)
        plain = backbone.model
        with torch.no_grad():
            single = interleaved_medians({
                "plain backbone (torch)": lambda: plain(x),
                "task unmerged (torch)": lambda: unmerged.forward(x, "task0"),
                "task merged (torch)": lambda: merged.forward(x, "task0"),
                "plain backbone (onnx)": lambda: plain_onnx.run(None, feed),
                "task merged (onnx)": lambda: merged_onnx.run(None, feed),
                "task base + ort adapter (onnx)": lambda: base_session.run(None, feed, run_options),
            }, repeats)

        multi = Runtime(backbone)
        memory = {"0": resident_bytes(multi)}
        for i, package in enumerate(late):
            multi.load(package)
            memory[str(i + 1)] = resident_bytes(multi)
        throughput = {}
        with torch.no_grad():
            for n in range(1, 5):
                names = [f"late{i}" for i in range(n)]
                medians = interleaved_medians({
                    "naive": lambda names=names: multi.forward_many(x, names, share_trunk=False),
                    "shared": lambda names=names: multi.forward_many(x, names, share_trunk=True),
                }, max(5, repeats // 2))
                throughput[n] = {"naive_s": medians["naive"], "shared_s": medians["shared"],
                                 "speedup": medians["naive"] / medians["shared"]}

        switch_rt = Runtime(backbone)
        switch_rt.load(full)
        switch_rt.load(late[0])
        merged_rt = Runtime(backbone, mode="merged")
        merged_rt.load(full)
        merged_rt.load(late[0])
        calls = {id(switch_rt): 0, id(merged_rt): 0}

        def swap(runtime):  # alternate between two tasks, so every call is a real switch
            calls[id(runtime)] += 1
            runtime.activate("task0" if calls[id(runtime)] % 2 else "late0")

        backbone_file = tmp / "full_model.safetensors"
        from petah.backbones import save_backbone

        save_backbone(backbone, backbone_file)
        switches = interleaved_medians({
            "unmerged swap": lambda: swap(switch_rt),
            "merged swap (unmerge + merge)": lambda: swap(merged_rt),
            "reload a full fine-tuned model": lambda: create_backbone(weights=str(backbone_file)),
        }, max(5, repeats // 2), warmup=1)

    base_time = single["plain backbone (torch)"]
    onnx_base = single["plain backbone (onnx)"]
    return {
        "backbone": name, "img_size": img_size, "batch": batch, "repeats": repeats, "threads": torch.get_num_threads(),
        "latency_ms": {k: round(v * 1e3, 3) for k, v in single.items()},
        "ratios": {
            "unmerged_torch / plain_torch": round(single["task unmerged (torch)"] / base_time, 3),
            "merged_torch / plain_torch": round(single["task merged (torch)"] / base_time, 3),
            "merged_onnx / plain_onnx": round(single["task merged (onnx)"] / onnx_base, 3),
            "ort_adapter / merged_onnx": round(
                single["task base + ort adapter (onnx)"] / single["task merged (onnx)"], 3),
        },
        "shared_trunk": {"stages": trunk_stages,
                         **{str(n): {k: round(v * 1e3, 3) if k.endswith("_s") else round(v, 3) for k, v in r.items()}
                            for n, r in throughput.items()}},
        "switch_ms": {k: round(v * 1e3, 4) for k, v in switches.items()},
        "switch_speedup_vs_reload": round(switches["reload a full fine-tuned model"] / switches["unmerged swap"], 1),
        "resident_bytes_by_tasks": memory,  # backbone + N packages (tensor bytes, fp32 in memory)
        "package_bytes": sum(int(t.nbytes) for t in full.tensors.values()),
        "backbone_bytes": backbone.weights_bytes,
    }
