"""`petah bench methods`: accuracy vs stored bytes vs speed across adaptation methods.

Every run is a separate process (``python -m petah.bench.methods RUN_JSON``), so its peak RSS is
its own. All methods see the same split: the built-in set's training part is split once
(seed 0) into train / val, and its own val part is the test set. A method's learning rate is
chosen on val with seed 0; the other seeds reuse it; test accuracy is reported.

The baseline "peft-by-hand" is what a user writes without petah: timm's classifier model,
``peft.get_peft_model`` with LoRA rank 8 on attention + MLP + stem / downsample convs and the
classifier in ``modules_to_save``, trained in train mode (BatchNorm too) by the same loop.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

SPLIT_SEED = 0
VAL_FRACTION = 0.2


@dataclass(frozen=True)
class Method:
    name: str
    plan: dict | None  # a petah PlanConfig as a dict; None for peft-by-hand
    rates: tuple[tuple[float, float], ...]  # (lr, head_lr) candidates, chosen on val


_ADAPTER_RATES = ((1e-3, 1e-2), (3e-3, 1e-2))
METHODS = {m.name: m for m in [
    Method("linear-probe", {"preset": "linear-probe"}, ((1e-2, 1e-2), (3e-2, 3e-2))),
    Method("bitfit", {"preset": "bitfit"}, ((3e-3, 1e-2), (1e-2, 1e-2))),
    Method("attn-lora", {"preset": "attn-lora", "rank": 8}, _ADAPTER_RATES),
    Method("peft-by-hand", None, _ADAPTER_RATES),
    *[Method(f"petah-r{r}", {"preset": "petah", "rank": r}, _ADAPTER_RATES) for r in (2, 4, 8, 16)],
    # the task also owns its BatchNorm statistics (and ships them): for targets far from the source
    Method("petah-r8-stats", {"preset": "petah", "rank": 8, "task_norm": "stats"}, _ADAPTER_RATES),
    Method("full", {"preset": "full"}, ((3e-4, 1e-2), (1e-3, 1e-2))),
]}
TASKS = ("digits", "textures", "faces")
SHOTS_METHODS = ("linear-probe", "petah-r8", "full")
# LoRA targets a user writes for EfficientFormerV2 by hand: attention, MLP, stem and downsample convs
PEFT_BY_HAND_TARGETS = (r".*(token_mixer\.(q|k|v|proj)(\.proj)?|mlp\.fc[12]|stem\.conv[12]|"
                        r"downsample\.(conv|attn\.(q\.proj|k|v|proj)))\.conv")


# --- one run (inside its own process) ------------------------------------------------------
def _splits(task: str, shots: int | None, max_train: int | None):
    from petah.data import load_builtin

    train_all, test = load_builtin(task)
    train, val = train_all.split(VAL_FRACTION, SPLIT_SEED)
    if shots is not None:  # the first `shots` images of each class, in a seeded order
        import torch

        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
        counts: dict[int, int] = {}
        keep = []
        for i in order:
            label = int(train.labels[i])
            if counts.get(label, 0) < shots:
                counts[label] = counts.get(label, 0) + 1
                keep.append(i)
        train = train.subset(sorted(keep), f"{train.source} ({shots} per class)")
    elif max_train is not None and len(train) > max_train:
        train = train.subset(list(range(max_train)), f"{train.source} (first {max_train})")
    return train, val, test


def _peft_by_hand(backbone, train, config):
    """The baseline: PEFT wired onto timm's classifier model by hand, trained by the same loop."""
    import peft
    import timm

    from petah.data import Augment
    from petah.tasks import Classification
    from petah.train import Trainer

    kwargs = {"img_size": backbone.img_size} if backbone.family and backbone.family.img_size_kwarg else {}
    model = timm.create_model(backbone.name, num_classes=len(train.classes), **kwargs)
    model.load_state_dict(backbone.model.state_dict(), strict=False)  # the classifier stays fresh
    classifier = model.pretrained_cfg.get("classifier")
    lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules=PEFT_BY_HAND_TARGETS,
                           modules_to_save=[classifier] if isinstance(classifier, str) else list(classifier))
    model = peft.get_peft_model(model, lora)
    params = [p for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" not in n]
    head = [p for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" in n]
    from petah.api import preprocess_for

    trainer = Trainer(model, params, head, Classification.loss(config.label_smoothing),
                      Classification.view(train, preprocess_for(backbone), Augment(), config.seed), config)
    result = trainer.fit()
    # What ships is the saved folder on the shared backbone. Training in train mode also moved
    # the BatchNorm running statistics, which the folder does not hold: reload to measure it.
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        stored = sum(f.stat().st_size for f in Path(tmp).iterdir())
        fresh = timm.create_model(backbone.name, num_classes=len(train.classes), **kwargs)
        fresh.load_state_dict(backbone.model.state_dict(), strict=False)
        shipped = peft.PeftModel.from_pretrained(fresh, tmp)
    return shipped, result, sum(p.numel() for p in params + head), stored, model


def _latency_ms(model, img_size: int, repeats: int = 20) -> float:
    import torch

    from petah.bench.latency import interleaved_medians

    x = torch.randn(1, 3, img_size, img_size)
    model.eval()
    with torch.no_grad():
        return 1e3 * interleaved_medians({"m": lambda: model(x)}, repeats)["m"]


def run_one(spec: dict) -> dict:
    """Train one method on one task with one seed and learning rate; measure it."""
    import torch

    from petah import api
    from petah.backbones import create_backbone
    from petah.plans import PlanConfig
    from petah.tasks import Classification
    from petah.train import TrainConfig

    torch.manual_seed(spec["seed"])
    backbone = create_backbone(weights=spec["backbone"])
    train, val, test = _splits(spec["task"], spec.get("shots"), spec.get("max_train"))
    lr, head_lr = spec["rates"]
    config = TrainConfig(epochs=spec["epochs"], batch_size=spec["batch_size"], lr=lr, head_lr=head_lr, seed=spec["seed"],
                         max_steps=spec.get("max_steps"), progress=False)
    method = METHODS[spec["method"]]
    unshipped = None
    if method.plan is None:
        model, result, trainable, stored, unshipped = _peft_by_hand(backbone, train, config)
    else:
        adapted = api.adapt(backbone, train, val, PlanConfig(**method.plan), config, spec["task"])
        with tempfile.TemporaryDirectory() as tmp:
            stored = api.save_package(adapted, Path(tmp) / "t.petah").stat().st_size
        model = api.load_task(backbone, adapted.package).model
        result, trainable = adapted.train, adapted.package.manifest["trainable_parameters"]
    preprocess = api.preprocess_for(backbone)
    scores = {name: Classification.evaluate(model, api._eval_loader(data, preprocess), data.classes)["accuracy"]
              for name, data in (("val", val), ("test", test))}
    if unshipped is not None:  # the in-process model, with BatchNorm statistics its folder lacks
        scores["test_in_process"] = Classification.evaluate(unshipped, api._eval_loader(test, preprocess), test.classes)["accuracy"]
    return {
        **spec, **scores, "trainable_params": int(trainable), "stored_bytes": int(stored),
        "backbone_bytes": backbone.weights_bytes, "train_images": len(train),
        "images_per_second": round(result.images_per_second, 1), "step_seconds": result.seconds / max(result.steps, 1),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "latency_ms": round(_latency_ms(model, backbone.img_size), 3),
    }


# --- the grid (the parent process) ---------------------------------------------------------
def _run_process(spec: dict) -> dict:
    env = {**os.environ, "PETAH_NO_PROGRESS": "1"}
    proc = subprocess.run([sys.executable, "-m", "petah.bench.methods", json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        from petah.errors import PetahError

        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        raise PetahError(f"bench run {spec['method']} on {spec['task']} failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@dataclass
class Grid:
    backbone: str
    methods: tuple[str, ...]
    tasks: tuple[str, ...] = TASKS
    seeds: int = 3
    epochs: int = 3
    batch_size: int = 64
    max_train: int | None = 600
    max_steps: int | None = None
    shots: tuple[int, ...] = ()
    shots_task: str = "digits"
    choose_rate: bool = True


def _summary(runs: list[dict]) -> dict:
    tests = [r["test"] for r in runs]
    first = runs[0]
    extra = {}
    if "test_in_process" in first:
        extra["test_in_process_mean"] = round(statistics.fmean(r["test_in_process"] for r in runs), 4)
    return {
        "test_mean": round(statistics.fmean(tests), 4),
        "test_std": round(statistics.stdev(tests), 4) if len(tests) > 1 else 0.0, **extra,
        "seeds": len(runs), "rates": first["rates"],
        **{k: first[k] for k in ("trainable_params", "stored_bytes", "backbone_bytes", "train_images")},
        **{k: round(statistics.fmean(r[k] for r in runs), 4)
           for k in ("images_per_second", "step_seconds", "peak_rss_bytes", "latency_ms")},
    }


def run_grid(grid: Grid, log=lambda message: print(message, file=sys.stderr, flush=True)) -> dict:
    base = {"backbone": grid.backbone, "epochs": grid.epochs, "batch_size": grid.batch_size,
            "max_train": grid.max_train, "max_steps": grid.max_steps}
    runs, table = [], {}
    start = time.perf_counter()
    for task in grid.tasks:
        for name in grid.methods:
            rates = METHODS[name].rates if grid.choose_rate else METHODS[name].rates[:1]
            trials = [_run_process({**base, "task": task, "method": name, "seed": 0, "rates": list(r)}) for r in rates]
            best = max(trials, key=lambda r: r["val"])
            seeds = [best] + [_run_process({**base, "task": task, "method": name, "seed": s, "rates": best["rates"]})
                              for s in range(1, grid.seeds)]
            runs += trials + seeds[1:]
            table.setdefault(task, {})[name] = _summary(seeds)
            log(f"{task} {name}: test {table[task][name]['test_mean']:.4f} ± {table[task][name]['test_std']:.4f} "
                f"(lr {best['rates'][0]}) {time.perf_counter() - start:.0f} s")
    shots = {}
    for n in grid.shots:
        for name in SHOTS_METHODS:
            if name not in grid.methods:
                continue
            rates = table.get(grid.shots_task, {}).get(name, {}).get("rates") or list(METHODS[name].rates[0])
            run = _run_process({**base, "task": grid.shots_task, "method": name, "seed": 0, "rates": rates,
                                "shots": n, "max_train": None})
            shots.setdefault(str(n), {})[name] = run["test"]
            log(f"{grid.shots_task} {n} shots {name}: {run['test']:.4f}")
    return {"grid": {k: v for k, v in grid.__dict__.items()}, "table": table, "shots": shots, "runs": runs,
            "seconds": round(time.perf_counter() - start, 1), "targets": targets(table)}


def targets(table: dict) -> dict:
    """The issue's three claims, checked on the measured table (None where a method is missing)."""
    out: dict = {}
    near_full = []
    for task, rows in table.items():
        if "full" not in rows:
            continue
        full = rows["full"]
        cands = [(n, r) for n, r in rows.items() if n.startswith("petah") and r["stored_bytes"] <= 0.03 * full["stored_bytes"]]
        if cands:
            name, best = max(cands, key=lambda nr: nr[1]["test_mean"])
            gap = round(100 * (full["test_mean"] - best["test_mean"]), 2)
            near_full.append({"task": task, "method": name, "gap_points": gap, "within_1_point": gap <= 1.0})
    out["petah_within_1pt_of_full_at_3pct_bytes"] = near_full
    beats = []
    for task, rows in table.items():
        if "attn-lora" not in rows:
            continue
        attn = rows["attn-lora"]
        cands = [(n, r) for n, r in rows.items() if n.startswith("petah") and r["stored_bytes"] <= attn["stored_bytes"]]
        if cands:
            name, best = max(cands, key=lambda nr: nr[1]["test_mean"])
            beats.append({"task": task, "method": name, "margin_points": round(100 * (best["test_mean"] - attn["test_mean"]), 2)})
    out["petah_vs_attn_lora_at_equal_or_fewer_bytes"] = beats
    speed = []
    for task, rows in table.items():
        if "full" in rows and "petah-r8" in rows:
            row = {"task": task,
                   "step_vs_full": round(rows["petah-r8"]["step_seconds"] / rows["full"]["step_seconds"], 3),
                   "peak_rss_vs_full": round(rows["petah-r8"]["peak_rss_bytes"] / rows["full"]["peak_rss_bytes"], 3)}
            if "peft-by-hand" in rows:
                row["step_vs_peft_by_hand"] = round(rows["petah-r8"]["step_seconds"] / rows["peft-by-hand"]["step_seconds"], 3)
                row["peft_by_hand_step_vs_full"] = round(rows["peft-by-hand"]["step_seconds"] / rows["full"]["step_seconds"], 3)
            speed.append(row)
    out["training_speed"] = speed
    return out


# --- report ------------------------------------------------------------------------------
def markdown(result: dict) -> str:
    lines = ["| task | method | test acc (mean ± std) | seeds | trainable params | stored bytes | % of backbone | "
             "train img/s | step ms | peak RSS MB | latency ms |", "|" + "---|" * 11]
    for task, rows in result["table"].items():
        for name, r in rows.items():
            lines.append(
                f"| {task} | {name} | {r['test_mean']:.4f} ± {r['test_std']:.4f} | {r['seeds']} | {r['trainable_params']:,} | "
                f"{r['stored_bytes']:,} | {100 * r['stored_bytes'] / r['backbone_bytes']:.2f} | {r['images_per_second']:.0f} | "
                f"{1e3 * r['step_seconds']:.0f} | {r['peak_rss_bytes'] / 2**20:.0f} | {r['latency_ms']:.2f} |")
    unshipped = [f"{task} {name}: {r['test_in_process_mean']:.4f}" for task, rows in result["table"].items()
                 for name, r in rows.items() if "test_in_process_mean" in r]
    if unshipped:
        lines += ["", "Test accuracy in the training process, with BatchNorm statistics the saved folder does not hold "
                  "(not what ships): " + "; ".join(unshipped) + "."]
    if result["shots"]:
        methods = sorted({m for row in result["shots"].values() for m in row})
        lines += ["", "| shots per class | " + " | ".join(methods) + " |", "|" + "---|" * (len(methods) + 1)]
        for n, row in result["shots"].items():
            lines.append(f"| {n} | " + " | ".join(f"{row[m]:.4f}" if m in row else "-" for m in methods) + " |")
    return "\n".join(lines) + "\n"


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both fewer bytes and higher accuracy, by bytes."""
    front, best = [], -1.0
    for x, y in sorted(points):
        if y > best:
            front.append((x, y))
            best = y
    return front


def plots(result: dict, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for key, label, log_x in (("stored_bytes", "stored bytes per task (log)", True), ("latency_ms", "latency, batch 1 (ms)", False)):
        tasks = list(result["table"])
        fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.8), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            rows = result["table"][task]
            for name, r in rows.items():
                ax.errorbar(r[key], r["test_mean"], yerr=r["test_std"], fmt="o", capsize=2, label=name)
            if key == "stored_bytes":
                front = pareto([(r[key], r["test_mean"]) for r in rows.values()])
                ax.plot(*zip(*front), "k--", lw=0.8, label="Pareto front")
            if log_x:
                ax.set_xscale("log")
            ax.set_title(task)
            ax.set_xlabel(label)
            ax.set_ylabel("test accuracy")
            ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=7, loc="lower right")
        fig.suptitle(f"{Path(result['grid']['backbone']).name}: accuracy vs {label.split(' (')[0]}", fontsize=10)
        fig.tight_layout()
        path = folder / f"methods-accuracy-vs-{key.split('_')[0]}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


if __name__ == "__main__":  # one run, as its own process: JSON spec in, one JSON line out
    print(json.dumps(run_one(json.loads(sys.argv[1]))))
