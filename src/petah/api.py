"""The Python API: prepare a backbone, adapt a task, evaluate, predict. The CLI only calls these."""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Subset

from petah.adapters import TaskAdapter
from petah.adapters.model import ADAPTER
from petah.backbones import Backbone, create_backbone, fingerprint, save_backbone
from petah.backbones.factory import fp32_safetensors_bytes
from petah.data import Augment, LabeledImages, Preprocess, TrainingView
from petah.errors import PetahError
from petah.packages.format import TaskPackage, check_backbone, pack_tensors, read_package, write_package
from petah.plans import PlanConfig, Target
from petah.tasks import Classification, kind_for_data, task_kind
from petah.train import TrainConfig, Trainer, TrainResult, barrier, is_main_process, setup
from petah.train.distributed import check_ranks_agree, eval_indices

EVAL_BATCH = 128
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def preprocess_for(backbone: Backbone) -> Preprocess:
    return Preprocess(backbone.img_size, backbone.mean, backbone.std)


def _eval_loader(data, preprocess: Preprocess, kind=Classification) -> DataLoader:
    """This rank's share of the evaluation set (all of it in one process); metrics sync on compute."""
    view = kind.view(data, preprocess)
    return DataLoader(Subset(view, eval_indices(len(view), setup())), batch_size=EVAL_BATCH, shuffle=False,
                      collate_fn=getattr(view, "collate", None))


def _data_identity(data) -> dict:
    labels = hashlib.sha256(data.label_digest()).hexdigest()
    return {"source": data.source, "images": len(data), "classes": data.classes, "labels_sha256": labels}


def _check_ranks(config: TrainConfig, train: LabeledImages, val: LabeledImages, **settings) -> None:
    setup()  # join the process group torchrun describes, if any
    check_ranks_agree("configuration", {"train": config.to_dict(), **settings})
    check_ranks_agree("data", {"train": _data_identity(train), "val": _data_identity(val)})


def _check_labels(train: LabeledImages, val: LabeledImages) -> None:
    if len(train) == 0 or len(val) == 0:
        raise PetahError(f"need training and validation images, got {len(train)} and {len(val)}")
    if train.classes != val.classes:
        raise PetahError("training and validation sets name different classes")


def _freeze_norms(model: nn.Module, backbone: nn.Module, modes: dict[str, bool]) -> None:
    """Train mode for ``model``, except the backbone norms that must not drift (eval mode)."""
    model.train()
    for name, module in backbone.named_modules():
        if modes.get(name) is False:
            module.eval()


# --- step 1: prepare ---------------------------------------------------------------------
def prepare(
    name: str,
    train: LabeledImages,
    val: LabeledImages,
    out: str | Path,
    img_size: int | None = None,
    weights: str = "none",
    config: TrainConfig | None = None,
    augment: Augment | None = Augment(),
    save_dtype: str = "float32",
    command: str = "",
) -> tuple[Backbone, dict]:
    """Fully train (or fine-tune) a backbone on a source dataset and save it as a backbone file."""
    if kind_for_data(train) is not Classification:
        raise PetahError("prepare trains a backbone on a classification set (class folders or a built-in one)")
    _check_labels(train, val)
    config = config or TrainConfig()
    _check_ranks(config, train, val, name=name, img_size=img_size, weights=weights, save_dtype=save_dtype)
    backbone = create_backbone(name, img_size, weights)
    backbone.model.requires_grad_(True)
    head = Classification.build_head(backbone.num_features, len(train.classes))
    model = Classification.build_model(backbone.model, head)
    trainer = Trainer(
        model, list(backbone.model.parameters()), list(head.parameters()),
        Classification.loss(config.label_smoothing), TrainingView(train, preprocess_for(backbone), augment, config.seed), config,
        sync_batchnorm=True,
    )
    result = trainer.fit()
    metrics = Classification.evaluate(trainer.model, _eval_loader(val, preprocess_for(backbone)), val.classes)
    backbone.model = trainer.model.backbone.cpu().requires_grad_(False).eval()
    extra = {
        "source_data": {"train": train.source, "val": val.source, "classes": train.classes, "images": len(train)},
        "command": command,
        "metrics": {"accuracy": metrics["accuracy"]},
        "training": {**config.to_dict(), "seconds": round(result.seconds, 1)},
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if is_main_process():
        save_backbone(backbone, out, extra, dtype=DTYPES[save_dtype])
    barrier()
    return create_backbone(weights=str(out)), metrics


# --- step 2: adapt -----------------------------------------------------------------------
def package_manifest(backbone: Backbone, adapter: TaskAdapter, head: nn.Module, task_name: str, labels: list[str],
                     kind=Classification) -> dict:
    """What a package must record to be attached again: task, backbone identity, plan, head."""
    return {
        "task": {"name": task_name, "kind": kind.kind, "labels": list(labels)},
        "backbone": backbone.identity(),
        "preprocessing": backbone.preprocessing(),
        "plan": {
            "config": adapter.config.to_dict(),
            "targets": [[t.module, t.method, t.rank] for t in adapter.targets],
            "overrides": adapter.override_keys,
        },
        "head": {**kind.head_manifest(head), "tensors": sorted(head.state_dict())},
    }


@dataclass
class AdaptResult:
    package: TaskPackage
    metrics: dict
    train: TrainResult


def adapt(
    backbone: Backbone,
    train: LabeledImages,
    val: LabeledImages,
    plan: PlanConfig | None = None,
    config: TrainConfig | None = None,
    task_name: str = "task",
    augment: Augment | None = Augment(),
    adapter_dtype: str = "float16",
    dice: bool = False,
) -> AdaptResult:
    """Train one task's adapters and head on a copy of ``backbone``; the shared one is untouched.

    The task kind follows the data: class labels (classification) or per-pixel masks
    (segmentation; ``dice`` adds a soft-dice term to the cross-entropy).
    """
    _check_labels(train, val)
    kind = kind_for_data(train)
    plan, config = plan or PlanConfig(), config or TrainConfig()
    _check_ranks(config, train, val, plan=plan.to_dict(), task=task_name, backbone=backbone.identity(), dtype=adapter_dtype,
                 kind=kind.kind, dice=dice)
    work = replace(backbone, model=copy.deepcopy(backbone.model))
    adapter = TaskAdapter(work, plan)
    head = kind.head_for(backbone, len(train.classes))
    model = kind.build_model(work.model, head)
    modes = adapter.norm_modes()
    trainer = Trainer(
        model, adapter.trainable_parameters(), list(head.parameters()),
        kind.loss(config.label_smoothing, dice, head=head, img_size=backbone.img_size),
        kind.view(train, preprocess_for(backbone), augment, config.seed), config,
        set_train_mode=lambda m: _freeze_norms(m, work.model, modes), unused_parameters=kind is not Classification,
    )
    result = trainer.fit()
    # Evaluate what ships: adapters round-tripped through the package dtype.
    tensors = pack_tensors(adapter.adapter_state(), adapter.override_state(), head.state_dict(), DTYPES[adapter_dtype])
    package = TaskPackage({}, tensors)
    adapter.load_state(package.section("adapter"), package.section("override"))
    metrics = kind.evaluate(trainer.model, _eval_loader(val, preprocess_for(backbone), kind), val.classes)
    package.manifest = {
        **package_manifest(backbone, adapter, head, task_name, train.classes, kind),
        "adapter_dtype": adapter_dtype,
        "trainable_parameters": sum(p.numel() for p in adapter.trainable_parameters()) + sum(p.numel() for p in head.parameters()),
        "metrics": metrics,
        "training": {**config.to_dict(), "seconds": round(result.seconds, 2), "steps": result.steps,
                     "images_per_second": round(result.images_per_second, 1),
                     "train_data": train.source, "val_data": val.source, "train_images": len(train)},
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    return AdaptResult(package, metrics, result)


def save_package(result: AdaptResult | TaskPackage, path: str | Path) -> Path:
    """Write the package (only the main process writes; the others wait for it)."""
    package = result.package if isinstance(result, AdaptResult) else result
    if is_main_process():
        write_package(path, package)
    barrier()
    return Path(path)


# --- step 3: prune -----------------------------------------------------------------------
def _image_loaders(backbone: Backbone, datasets: list, batch_size: int, seed: int) -> list[DataLoader]:
    """One shuffled loader per task's data; batches start with the images whatever the task kind."""
    loaders = []
    for index, data in enumerate(datasets):
        view = kind_for_data(data).view(data, preprocess_for(backbone), Augment(), seed + index)
        loaders.append(DataLoader(view, batch_size=batch_size, shuffle=True, collate_fn=getattr(view, "collate", None),
                                  generator=torch.Generator().manual_seed(seed + index)))
    return loaders


def backbone_cost(model: nn.Module, img_size: int) -> dict:
    """Parameters and multiply-accumulates of one image at the working size (Torch-Pruning's counter)."""
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(model, torch.zeros(1, 3, img_size, img_size))
    return {"params": int(params), "macs": int(macs)}


def prune_backbone(backbone: Backbone, config, datasets: list | None = None) -> tuple[Backbone, dict]:
    """A pruned copy of ``backbone`` (the original is untouched) and a report of what it cost and saved.

    ``datasets``: the data of every task the backbone will serve (images only are used): Taylor
    importance is measured on all of them together, and recovery distils on them.
    """
    from petah.prune import describe_changes, prune_model, recover
    from petah.prune.pruner import check_prunable

    family = backbone.family
    if backbone.pruned:
        raise PetahError(f"{backbone.describe()} is already pruned; prune the original backbone again at the new ratio")
    if family is None or not family.prunable:
        check_prunable(backbone.model)  # names an attention layer without a pruner, if there is one
        raise PetahError(f"petah cannot prune {backbone.name} (family {family.name if family else 'unknown'}); "
                         "supported: EfficientFormer, EfficientFormerV2, MobileNet and ResNet")
    datasets = list(datasets or [])
    torch.manual_seed(config.seed)
    loaders = _image_loaders(backbone, datasets, config.batch_size, config.seed)
    example = torch.zeros(1, 3, backbone.img_size, backbone.img_size)
    model = copy.deepcopy(backbone.model)
    before = backbone_cost(backbone.model, backbone.img_size)
    report = prune_model(model, example, config, loaders)
    report["recovery"] = recover(model, backbone.model, loaders, config, example)
    pruned = replace(backbone, model=model, architecture=describe_changes(backbone.model, model),
                     fingerprint=fingerprint(model), weights_bytes=fp32_safetensors_bytes(model))
    after = backbone_cost(model, backbone.img_size)
    report.update({
        "config": config.to_dict(),
        "data": [d.source for d in datasets],
        "base": {"fingerprint": backbone.fingerprint, **before, "weights_bytes": backbone.weights_bytes},
        "pruned": {"fingerprint": pruned.fingerprint, **after, "weights_bytes": pruned.weights_bytes},
    })
    pruned.source = {**backbone.source, "pruning": report}
    return pruned, report


def save_pruned(pruned: Backbone, report: dict, path: str | Path, command: str = "") -> Path:
    """Write a pruned backbone file: weights + the architecture + how it was pruned (JSON, no pickle)."""
    extra = {k: pruned.source[k] for k in ("source_data", "metrics") if k in pruned.source}
    extra.update({"pruning": {**report, "command": command}, "command": command,
                  "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")})
    return save_backbone(pruned, path, extra)


def inspect_backbone(path: str | Path) -> dict:
    """Identity, parameters, MACs and file size of a backbone file (pruned or not)."""
    path = Path(path)
    backbone = create_backbone(weights=str(path))
    pruning = backbone.source.get("pruning") or {}
    return {
        "backbone": backbone.name,
        "img_size": backbone.img_size,
        "fingerprint": backbone.fingerprint,
        "pruned": backbone.pruned,
        "file_bytes": path.stat().st_size,
        "weights_bytes": backbone.weights_bytes,
        **backbone_cost(backbone.model, backbone.img_size),
        "num_features": backbone.num_features,
        "pruning": {k: pruning[k] for k in ("config", "base", "heads_removed", "recovery", "data") if k in pruning},
    }


# --- loading, eval, predict --------------------------------------------------------------
@dataclass
class LoadedTask:
    manifest: dict
    model: nn.Module
    adapter: TaskAdapter
    preprocess: Preprocess

    @property
    def classes(self) -> list[str]:
        return self.manifest["task"]["labels"]

    @property
    def name(self) -> str:
        return self.manifest["task"]["name"]


def attach_package(backbone: Backbone, package: TaskPackage, origin: str, name: str = ADAPTER) -> tuple[TaskAdapter, nn.Module]:
    """Add a package's adapters (as adapter ``name``) to ``backbone.model`` in place; build its head."""
    manifest = package.manifest
    kind = task_kind(manifest["task"]["kind"])
    plan = PlanConfig.from_dict(manifest["plan"]["config"])
    targets = [Target(m, method, int(r)) for m, method, r in manifest["plan"]["targets"]]
    try:
        adapter = TaskAdapter(backbone, plan, targets=targets, name=name)
    except (AttributeError, ValueError) as exc:
        raise PetahError(f"{origin} names layers this backbone lacks: {exc}") from exc
    adapter.load_state(package.section("adapter"), package.section("override"))
    head_info = manifest["head"]
    head = kind.head_from_manifest(head_info)
    try:
        head.load_state_dict(package.section("head"))
    except RuntimeError as exc:
        raise PetahError(f"{origin}: head tensors do not fit: {str(exc).splitlines()[0]}") from exc
    return adapter, head.eval()


def load_task(backbone: Backbone, package: TaskPackage | str | Path) -> LoadedTask:
    """Attach a package to a copy of ``backbone`` (refused unless it was trained on it)."""
    origin = f"package {package}" if not isinstance(package, TaskPackage) else f"package {package.task_name}"
    if not isinstance(package, TaskPackage):
        package = read_package(package)
    manifest = package.manifest
    check_backbone(manifest, backbone, origin)
    work = replace(backbone, model=copy.deepcopy(backbone.model))
    adapter, head = attach_package(work, package, origin)
    model = task_kind(manifest["task"]["kind"]).build_model(work.model, head).eval()
    return LoadedTask(manifest, model, adapter, Preprocess.from_dict(manifest["preprocessing"]))


def merged_backbone(backbone: Backbone, package: TaskPackage | str | Path) -> tuple[Backbone, LoadedTask]:
    """The task's adapters folded into a plain copy of the backbone: a task-specific backbone
    (its own fingerprint), e.g. to prune per task after adapting."""
    from petah.backbones import build_plain

    task = load_task(backbone, package)
    task.adapter.merge()
    plain = build_plain(backbone, task.adapter.backbone_weights())
    merged = replace(backbone, model=plain, fingerprint=fingerprint(plain),
                     source={**backbone.source, "merged_task": task.manifest["task"]["name"]})
    return merged, task


def evaluate(backbone: Backbone, package: TaskPackage | str | Path, data: LabeledImages) -> dict:
    task = load_task(backbone, package)
    kind = task_kind(task.manifest["task"]["kind"])
    if kind is not kind_for_data(data):
        raise PetahError(f"package {task.name} is a {kind.kind} task; the evaluation data is labelled for {kind_for_data(data).kind}")
    if data.classes != task.classes:
        raise PetahError(f"the evaluation data's classes {data.classes[:4]}… differ from the package's {task.classes[:4]}…")
    return kind.evaluate(task.model, _eval_loader(data, task.preprocess, kind), data.classes)


def open_runtime(backbone: Backbone, packages: list):
    """A runtime holding every package once; two packages of the same task name are refused."""
    from petah.runtime import Runtime

    runtime = Runtime(backbone)
    for package in packages:
        loaded = len(runtime.tasks)
        task = runtime.load(package)
        if len(runtime.tasks) == loaded:  # load() replaced a task of that name
            raise PetahError(f"two packages are named task {task.name!r}; give each task its own name")
    return runtime


def predict(backbone: Backbone, packages: list, images: list[torch.Tensor], top_k: int = 3) -> dict[str, list[dict]]:
    """Per-task predictions for RGB uint8 image tensors, all packages on one resident backbone."""
    return open_runtime(backbone, packages).run(images, top_k=top_k)


def image_files(paths: list[str | Path]) -> list[Path]:
    """Files as given, folders expanded to the images inside them (sorted)."""
    from petah.data.images import IMAGE_SUFFIXES

    out: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            out += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            out.append(path)
    return out


def predict_files(backbone: Backbone, packages: list, paths: list[str | Path], top_k: int = 3, out_dir: str | Path | None = None):
    """Yield one JSON-ready result per image file, on one resident backbone; a bad file yields an
    error entry. With ``out_dir``, segmentation masks (class-index PNG + overlay) and detection
    overlays (boxes drawn) are written there; boxes are in the JSON either way."""
    from petah.data import load_image
    from petah.tasks.detection import save_box_overlay
    from petah.tasks.segmentation import save_mask, save_overlay

    runtime = open_runtime(backbone, packages)
    files = image_files(paths)
    names = _unique_stems(files)
    for path in files:
        try:
            image = load_image(path)
        except PetahError as exc:
            yield {"image": str(path), "error": str(exc)}
            continue
        tasks = {}
        for name, preds in runtime.run([image], top_k=top_k).items():
            result = dict(preds[0])
            mask = result.pop("mask", None)
            safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)  # a task name never leaves --out-dir
            if mask is not None and out_dir is not None:
                base = Path(out_dir) / f"{names[path]}.{safe}"
                base.parent.mkdir(parents=True, exist_ok=True)
                save_mask(mask, f"{base}.mask.png")
                save_overlay(image, mask, f"{base}.overlay.png")
                result.update({"mask": f"{base}.mask.png", "overlay": f"{base}.overlay.png"})
            if "boxes" in result and out_dir is not None:
                base = Path(out_dir) / f"{names[path]}.{safe}"
                base.parent.mkdir(parents=True, exist_ok=True)
                save_box_overlay(image, result["boxes"], f"{base}.boxes.png")
                result["overlay"] = f"{base}.boxes.png"
            tasks[name] = result
        yield {"image": str(path), "tasks": tasks}


def _unique_stems(files: list[Path]) -> dict[Path, str]:
    """Output names per input file: the stem, or the stem with a counter when two files share it."""
    seen: dict[str, int] = {}
    names = {}
    for path in files:
        count = seen.get(path.stem, 0)
        seen[path.stem] = count + 1
        names[path] = path.stem if count == 0 else f"{path.stem}-{count}"
    return names


def inspect_package(path: str | Path) -> dict:
    """Manifest summary and sizes of a package file (validated as on load)."""
    path = Path(path)
    package = read_package(path)
    manifest = package.manifest
    package_bytes = path.stat().st_size
    backbone_bytes = int(manifest["backbone"].get("weights_bytes") or 0)
    sections = {
        name: {"tensors": len(part), "parameters": sum(t.numel() for t in part.values()),
               "bytes": sum(t.numel() * t.element_size() for t in part.values())}
        for name in ("adapter", "override", "head")
        for part in [package.section(name)]
    }
    return {
        "package": str(path),
        "package_bytes": package_bytes,
        "backbone_bytes": backbone_bytes,
        "ratio": round(package_bytes / backbone_bytes, 6) if backbone_bytes else None,
        "backbone": manifest["backbone"]["name"],
        "img_size": manifest["backbone"]["img_size"],
        "fingerprint": manifest["backbone"]["fingerprint"],
        "plan": manifest["plan"]["config"],
        "adapted_layers": len(manifest["plan"]["targets"]),
        "task": manifest["task"],
        "metrics": {k: v for k, v in manifest["metrics"].items() if k in ("accuracy", "mIoU", "mAP", "mAP50", "samples")},
        "sections": sections,
        "adapter_dtype": manifest.get("adapter_dtype"),
        "format_version": manifest["format_version"],
        "petah_version": manifest.get("petah_version"),
        "created_at": manifest.get("created_at"),
        "training": manifest.get("training", {}),
    }


__all__ = [
    "AdaptResult", "LoadedTask", "adapt", "attach_package", "package_manifest", "create_backbone", "evaluate", "fingerprint", "image_files", "inspect_backbone",
    "inspect_package", "load_task", "merged_backbone", "open_runtime", "predict", "predict_files", "prepare", "prune_backbone", "save_package",
    "save_pruned",
]


def plan_summary(backbone: Backbone, plan: PlanConfig, classes: int = 10) -> dict:
    """Which layers a plan adapts on ``backbone`` and what it trains — before any training."""
    work = replace(backbone, model=copy.deepcopy(backbone.model))
    adapter = TaskAdapter(work, plan)
    adapters = adapter.adapter_state()
    layers = []
    for target in adapter.targets:
        params = sum(v.numel() for k, v in adapters.items() if k.rpartition(".")[0] == target.module)
        layer = backbone.model.get_submodule(target.module)
        layers.append({"module": target.module, "type": type(layer).__name__, "method": target.method,
                       "rank": target.rank, "parameters": params})
    owned = sum(t.numel() for t in adapter.override_state().values())
    head = Classification.build_head(backbone.num_features, classes)
    head_params = sum(p.numel() for p in head.parameters())
    backbone_params = sum(p.numel() for p in backbone.model.parameters())
    trainable = sum(layer["parameters"] for layer in layers) + owned
    return {
        "backbone": backbone.name, "img_size": backbone.img_size,
        "family": backbone.family.name if backbone.family else None,
        "plan": plan.to_dict(), "layers": layers,
        "adapter_parameters": trainable - owned, "owned_parameters": owned, "owned_tensors": len(adapter.override_keys),
        "head_parameters": head_params, "head_classes": classes,
        "backbone_parameters": backbone_params,
        "trainable_percent": round(100 * (trainable + head_params) / backbone_params, 3),
    }
