"""The Python API: prepare a backbone, adapt a task, evaluate, predict. The CLI only calls these."""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import math
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Subset

from petah.adapters import TaskAdapter
from petah.backbones import Backbone, create_backbone, fingerprint, resolve_backbone, save_backbone
from petah.backbones.factory import fp32_safetensors_bytes
from petah.data import Augment, LabeledImages, Preprocess, TrainingView
from petah.errors import PetahError
from petah.files import check_writable
from petah.packages import TaskPackage, check_task_name, describe_package, write_package
from petah.packages.manifest import MAX_LABEL_CHARS, MAX_LABELS
from petah.packages.reference import FIELD as REFERENCE_FIELD
from petah.packages.reference import REFERENCE_ROOM
from petah.plans import LAYOUT_OPTIONS, PlanConfig
from petah.plans.budget import budget_bytes
from petah.runtime.attach import (
    LoadedTask,
    attach_package,
    build_package,
    check_dtype,
    load_task,
    merged_backbone,
    torch_section,
)
from petah.tasks import TASK_KINDS, Classification, kind_for_data
from petah.tasks.anomaly import Anomaly, AnomalyConfig, bank_rows, choose_threshold
from petah.tasks.anomaly import report as anomaly_report
from petah.tasks.reference import reference_profile
from petah.train import TrainConfig, Trainer, TrainResult, barrier, is_main_process, setup
from petah.train.distributed import check_ranks_agree, eval_indices
from petah.train.trainer import frozen_norms, schedule_steps

EVAL_BATCH = 128
DEFAULT_AUGMENT = Augment()  # frozen: safe to share as a default; None means no augmentation


def preprocess_for(backbone: Backbone) -> Preprocess:
    return Preprocess(backbone.img_size, backbone.mean, backbone.std)


def eval_loader(data, preprocess: Preprocess, kind=Classification) -> DataLoader:
    """Batches of ``data`` to evaluate a model of task ``kind`` on: this rank's share of the set
    (all of it in one process); metrics sync on compute."""
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


CLASS_NOUNS = {"classification": "class folder", "segmentation": "class", "detection": "category",
               "anomaly": "class"}  # as DATA has them


def _check_label_limits(data: LabeledImages) -> None:
    """Refuse class names a package cannot hold (the limits its manifest is read with) before any
    training, naming the class as the data has it rather than the manifest field it would fail as."""
    if len(data.classes) > MAX_LABELS:
        raise PetahError(f"{data.source}: {len(data.classes):,} classes; a package holds at most {MAX_LABELS:,}")
    noun = CLASS_NOUNS[kind_for_data(data).kind]
    for name in data.classes:
        shown = name if len(name) <= 40 else name[:40] + "…"
        where = f"{noun} {shown!r} in {data.source}"
        if not 0 < len(name) <= MAX_LABEL_CHARS:
            limit = f"at most {MAX_LABEL_CHARS}" if name else "at least 1"
            raise PetahError(f"{where}: label is {len(name)} characters; a package label holds {limit}")
        try:
            name.encode("utf-8")  # a folder name of undecodable bytes: the manifest is UTF-8 JSON
        except UnicodeEncodeError:
            raise PetahError(f"{where}: the name is not valid UTF-8, which a package label must be") from None


def check_task(task: str | None, data: LabeledImages):
    """The task kind ``data`` is labelled for; ``task`` (a kind name), when given, must agree."""
    kind = kind_for_data(data)
    if task is not None and task not in TASK_KINDS:
        raise PetahError(f"unknown task kind {task!r}; choose one of {', '.join(TASK_KINDS)}")
    if task is not None and task != kind.kind:
        raise PetahError(f"task {task}: {data.source} is labelled for {kind.kind} (segmentation: images/ + masks/ + "
                         "classes.txt, or builtin:defects; detection: a COCO annotations.json, or builtin:digit-boxes; "
                         "anomaly: MVTec AD's train/good/ + test/, or builtin:surface-anomalies)")
    return kind


# --- step 1: prepare ---------------------------------------------------------------------
def prepare(
    name: str,
    train: LabeledImages,
    val: LabeledImages,
    out: str | Path,
    *,
    img_size: int | None = None,
    weights: str = "none",
    config: TrainConfig | None = None,
    augment: Augment | None = DEFAULT_AUGMENT,
    save_dtype: str = "float32",
    command: str = "",
) -> tuple[Backbone, dict]:
    """Fully train (or fine-tune) a backbone on a source dataset and save it as a backbone file."""
    stored = check_dtype("save_dtype", save_dtype)
    check_writable(out)
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
        Classification.loss(config.label_smoothing),
        TrainingView(train, preprocess_for(backbone), augment, config.seed), config,
        sync_batchnorm=True,
    )
    result = trainer.fit()
    metrics = Classification.evaluate(trainer.model, eval_loader(val, preprocess_for(backbone)), val.classes)
    backbone.model = trainer.model.backbone.cpu().requires_grad_(False).eval()
    extra = {
        "source_data": {"train": train.source, "val": val.source, "classes": train.classes, "images": len(train)},
        "command": command,
        "metrics": {"accuracy": metrics["accuracy"]},
        "training": {**config.to_dict(), "seconds": round(result.seconds, 1)},
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    if is_main_process():
        save_backbone(backbone, out, extra, dtype=stored)
    barrier()
    return create_backbone(weights=str(out)), metrics


# --- step 2: adapt -----------------------------------------------------------------------
@dataclass
class AdaptResult:
    package: TaskPackage
    metrics: dict
    train: TrainResult


def default_plan(kind, backbone: Backbone, classes: int, plan: PlanConfig | None = None,
                 given: frozenset[str] | set[str] = frozenset()) -> PlanConfig:
    """The plan a task gets from ``petah adapt`` when no option chose its layers (``given``: the
    PlanConfig fields set by the caller; ``plan``: those settings): the task kind's default budget
    (``kind.default_budget``), or the uniform plan where the kind has none, where a layout option
    was given, or where the head alone would take more than half the budget (a many-class head on a
    small backbone: the adapters would get too little to be worth a probe)."""
    plan = plan or PlanConfig()
    budget = kind.default_budget
    if budget is None or set(given) & LAYOUT_OPTIONS:
        return plan
    with torch.random.fork_rng(devices=[]):  # a head built to be counted must not move the seeded training's RNG
        head_bytes = 2 * sum(p.numel() for p in kind.head_for(backbone, classes).parameters())  # float16
    if head_bytes > budget_bytes(budget, backbone.weights_bytes) / 2:
        return plan
    return replace(plan, budget=budget)


def default_training(kind, images: int, config: TrainConfig | None = None,
                     given: frozenset[str] | set[str] = frozenset()) -> TrainConfig:
    """The training settings a task gets where the caller set none (``given``: the TrainConfig
    fields set; ``config``: those settings): a kind with a ``first_run`` trains for at least its
    ``min_steps`` optimizer steps over ``images`` images (10 to ``max_epochs`` epochs) with its
    head rate, so a small data set's first run does not stop after a few dozen steps."""
    config = config or TrainConfig()
    rule = kind.first_run
    if rule is None:
        return config
    chosen = {}
    if "epochs" not in given:
        per_epoch = math.ceil(images / config.batch_size)
        chosen["epochs"] = max(config.epochs, min(rule.max_epochs, math.ceil(rule.min_steps / per_epoch)))
    if "head_lr" not in given:
        chosen["head_lr"] = rule.head_lr
    return replace(config, **chosen)


def adapt(
    backbone: Backbone,
    train: LabeledImages,
    val: LabeledImages,
    *,
    plan: PlanConfig | None = None,
    config: TrainConfig | None = None,
    task_name: str = "task",
    augment: Augment | None = DEFAULT_AUGMENT,
    adapter_dtype: str = "float16",
    dice: bool = False,
    task: str | None = None,
    output: str | Path | None = None,
    anomaly: AnomalyConfig | None = None,
) -> AdaptResult:
    """Train one task's adapters and head on a copy of ``backbone``; the shared one is untouched.

    The task kind follows the data: class labels (classification) or per-pixel masks
    (segmentation; ``dice`` adds a soft-dice term to the cross-entropy). ``task``, when given, must
    agree with it. With ``output`` the package is written there, and the path is checked before
    any training. Anomaly data (good images to learn from) is fitted instead (``anomaly``: its
    bank and threshold settings; see ``_fit_anomaly``). Without ``plan``, the task kind's default
    (``default_plan``: a 3 % budget for classification, the uniform rank-8 plan otherwise); without
    ``config``, the kind's training defaults for this data (``default_training``).
    """
    check_dtype("adapter_dtype", adapter_dtype)
    if output is not None:
        check_writable(output)
    check_task_name(task_name)
    _check_labels(train, val)
    _check_label_limits(train)  # the validation set names the same classes
    kind = check_task(task, train)
    if config is None:
        config = default_training(kind, len(train))
    if plan is None:
        plan = default_plan(kind, backbone, len(train.classes))
    if kind is Anomaly:
        return _fit_anomaly(backbone, train, val, plan, config, task_name, anomaly or AnomalyConfig(), output)
    if config.lp_ft and (kind is not Classification or plan.preset == "linear-probe"):
        instead = kind.kind if kind is not Classification else "--plan linear-probe"
        raise PetahError(f"--lp-ft fits a linear head before training adapters: it applies to classification "
                         f"tasks with adapters, not {instead}")
    if config.lora_plus is None:  # the task kind's measured default
        config = replace(config, lora_plus=kind.lora_plus)
    _check_ranks(config, train, val, plan=plan.to_dict(), task=task_name,
                 backbone=backbone.identity(), dtype=adapter_dtype,
                 kind=kind.kind, dice=dice)
    work = replace(backbone, model=copy.deepcopy(backbone.model))
    view = kind.view(train, preprocess_for(backbone), augment, config.seed)
    allocation = None
    if plan.budget is not None:  # the head first: the probe trains it briefly (then resets it)
        head = kind.head_for(backbone, len(train.classes))
        allocation = _allocate(work, plan, config, kind, head, view, dice, task_name, train, val, adapter_dtype)
        plan = allocation.plan
        adapter = TaskAdapter(work, plan, allocation.targets)
    else:
        adapter = TaskAdapter(work, plan)
        head = kind.head_for(backbone, len(train.classes))
    before_training = 0.0  # seconds of EVA's probe and LP-FT's fit: part of the training time
    if plan.lora_init == "eva":
        from petah.train.eva import eva_init

        before_training += eva_init(adapter, view, config, schedule_steps(config, len(view)))
    model = kind.build_model(work.model, head)
    probe = None
    if kind is Classification and (plan.preset == "linear-probe" or config.lp_ft):
        # a probe fitted, not trained (petah.train.probe): the whole task, or LP-FT's starting head
        from petah.train.probe import fit_linear_probe

        features = DataLoader(kind.view(train, preprocess_for(backbone)), batch_size=EVAL_BATCH, shuffle=False)
        result, probe = fit_linear_probe(work.model, head, features, len(train.classes), config.seed)
        before_training += result.seconds
    if plan.preset != "linear-probe" or kind is not Classification:
        trainer = Trainer(
            model, adapter.trainable_parameters(), list(head.parameters()),
            kind.loss(config.label_smoothing, dice, head=head, img_size=backbone.img_size), view, config,
            set_train_mode=frozen_norms(work.model, adapter.norm_modes()), unused_parameters=kind is not Classification,
            fast_params=adapter.lora_b_parameters(),
        )
        result = trainer.fit()
        model = trainer.model
        result = replace(result, seconds=result.seconds + before_training)
    trainable = sum(p.numel() for p in adapter.trainable_parameters()) + sum(p.numel() for p in head.parameters())
    package = build_package(backbone, adapter, head, task_name=task_name, labels=train.classes, kind=kind,
                            adapter_dtype=adapter_dtype, trainable_parameters=trainable,
                            preprocessing={**backbone.preprocessing(), "intensity": train.intensity})
    # Evaluate what ships: adapters round-tripped through the package dtype.
    adapter.load_state(torch_section(package, "adapter"), torch_section(package, "override"))
    metrics = kind.evaluate(model, eval_loader(val, preprocess_for(backbone), kind), val.classes)
    package.manifest.metrics = metrics
    package.manifest.extra[REFERENCE_FIELD] = reference_profile(
        kind, model, eval_loader(train, preprocess_for(backbone), kind),
        eval_loader(val, preprocess_for(backbone), kind), preprocess_for(backbone), metrics)
    package.manifest.training = {**config.to_dict(), "seconds": round(result.seconds, 2), "steps": result.steps,
                                 "images_per_second": round(result.images_per_second, 1),
                                 "train_data": train.source, "val_data": val.source, "train_images": len(train)}
    if allocation is not None:
        package.manifest.training["allocation"] = allocation.report
    if probe is not None:
        package.manifest.training["probe"] = probe
    adapted = AdaptResult(package, metrics, result)
    if output is not None:
        save_package(adapted, output)
    return adapted


def _fit_anomaly(backbone: Backbone, train, val, plan: PlanConfig, config: TrainConfig, task_name: str,
                 settings: AnomalyConfig, output: str | Path | None) -> AdaptResult:
    """An anomaly task: a coreset of the good training images' patch features on the frozen
    backbone (no adapter yet: ``petah.tasks.anomaly``), its threshold chosen on the validation
    images; with ``plan.budget`` the bank gets what the budget leaves beside the manifest."""
    from petah.plans.base import DEFAULT_RANK

    if (plan.preset not in ("petah", "linear-probe") or plan.rank != DEFAULT_RANK or plan.stage_ranks
            or plan.targets or plan.task_norm != "none"):
        raise PetahError("anomaly tasks adapt no layer (the bank sits on the frozen backbone): drop --plan, --rank, "
                         "--stage-rank, --target and --task-norm")
    if train.labels.any():
        raise PetahError(f"{train.source}: anomaly training takes good images only")
    head_only = PlanConfig(preset="linear-probe")
    started = time.perf_counter()
    preprocess = preprocess_for(backbone)
    head = Anomaly.head_for(backbone, strides=settings.feature_strides)
    dim = sum(head.in_channels)
    budget = None
    if plan.budget is not None:
        one_row = planned_bytes(backbone, head_only, train, val, head=head, task_name=task_name)
        budget = budget_bytes(plan.budget, backbone.weights_bytes) - one_row + dim * 2
    fitted = Anomaly.fit(backbone.model, head, eval_loader(train, preprocess, Anomaly),
                         lambda patches: bank_rows(budget, dim, patches, settings.coreset_ratio), config.seed)
    patches = len(train) * _patches_per_image(backbone, fitted)
    model = Anomaly.build_model(backbone.model, fitted)
    scores, anomalous, maps, masks = Anomaly.scores(model, eval_loader(val, preprocess, Anomaly))
    fitted.threshold, rule = choose_threshold(scores, anomalous, settings.max_false_reject)
    metrics = anomaly_report(scores, anomalous, maps, masks, fitted.threshold)
    reference = reference_profile(Anomaly, model, eval_loader(train, preprocess, Anomaly),
                                  eval_loader(val, preprocess, Anomaly), preprocess, metrics)
    seconds = time.perf_counter() - started
    frozen = {name: p.requires_grad for name, p in backbone.model.named_parameters()}
    adapter = TaskAdapter(backbone, head_only, targets=[], name="anomaly-package")  # adds nothing: no targets
    try:
        package = build_package(backbone, adapter, fitted, task_name=task_name, labels=train.classes, kind=Anomaly,
                                trainable_parameters=0, metrics=metrics,
                                preprocessing={**backbone.preprocessing(), "intensity": train.intensity},
                                training={"method": "patchcore", "seed": config.seed, "seconds": round(seconds, 2),
                                          "coreset_ratio": settings.coreset_ratio, "budget": plan.budget,
                                          "bank_rows": fitted.size, "good_patches": patches,
                                          "threshold_rule": rule, "max_false_reject": settings.max_false_reject,
                                          "train_data": train.source, "val_data": val.source,
                                          "train_images": len(train)})
        package.manifest.extra[REFERENCE_FIELD] = reference
    finally:
        adapter.remove()
        for name, param in backbone.model.named_parameters():  # the caller's backbone, as it was
            param.requires_grad_(frozen[name])
    fitted_only = TrainResult(steps=0, epochs=0, seconds=seconds, images_per_second=0.0, last_loss=0.0)
    adapted = AdaptResult(package, metrics, fitted_only)
    if output is not None:
        save_package(adapted, output)
    return adapted


def _patches_per_image(backbone: Backbone, head) -> int:
    side = math.ceil(backbone.img_size / head.strides[0])
    return side * side


def _metadata_room(classes: list[str], val_images: int) -> int:
    """Bytes the manifest gains after training (metrics: a confusion matrix, per-class scores;
    the training record; the reference profile), bounded from above, so a budget is met before the metrics are known."""
    per_class = sum(2 * len(name) + 60 for name in classes)
    return 2500 + per_class + len(classes) ** 2 * (len(str(val_images)) + 2) + REFERENCE_ROOM


def planned_bytes(backbone: Backbone, plan: PlanConfig, train: LabeledImages, val: LabeledImages, *,
                  adapter_dtype: str = "float16", targets: list | None = None, head: nn.Module | None = None,
                  task_name: str = "task", in_place: bool = False) -> int:
    """The bytes of the package ``adapt`` writes for ``plan`` (or these ``targets``) on this data,
    known before training: the package built untrained, plus an upper bound on what training adds
    to its manifest. ``head``: the task's head (default: a fresh one). ``in_place``: adapt
    ``backbone``'s own model for the measurement and take the adapters out again (a private copy
    only: it saves a deep copy per call)."""
    from petah.packages.format import encode_package

    kind = kind_for_data(train)
    work = backbone if in_place else replace(backbone, model=copy.deepcopy(backbone.model))
    trial = TaskAdapter(work, plan, targets, name="planned-bytes")
    try:
        package = build_package(work, trial, head if head is not None else kind.head_for(backbone, len(train.classes)),
                                task_name=task_name, labels=train.classes, kind=kind, adapter_dtype=adapter_dtype,
                                trainable_parameters=10**9,
                                preprocessing={**backbone.preprocessing(), "intensity": train.intensity})
    finally:
        trial.remove()
    return len(encode_package(package)) + _metadata_room(train.classes, len(val))


def _allocate(work: Backbone, plan: PlanConfig, config: TrainConfig, kind, head: nn.Module, view, dice: bool,
              task_name: str, train: LabeledImages, val: LabeledImages, adapter_dtype: str):
    """``--budget``: choose the plan's ranks, channel scales and owned norms on this task's data
    (``petah.train.allocate``), pricing each choice by the package it would write."""
    from petah.train.allocate import ProbeContext, allocate_budget

    def package_bytes(trial_plan: PlanConfig, targets: list) -> int:
        return planned_bytes(work, trial_plan, train, val, adapter_dtype=adapter_dtype, targets=targets, head=head,
                             task_name=task_name, in_place=True)

    model = kind.build_model(work.model, head)
    context = ProbeContext(model, work.model, head, kind.loss(config.label_smoothing, dice, head=head,
                                                                img_size=work.img_size),
                           view, config, frozen_norms(work.model), schedule_steps(config, len(view)))
    return allocate_budget(context, plan, work, budget_bytes(plan.budget, work.weights_bytes), package_bytes,
                           adapter_dtype)


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


def prune_backbone(backbone: Backbone, *, config=None, datasets: list | None = None, output: str | Path | None = None,
                   command: str = "") -> tuple[Backbone, dict]:
    """A pruned copy of ``backbone`` (the original is untouched) and a report of what it cost and saved.

    ``config``: a ``PruneConfig`` (default: its defaults). ``datasets``: the data of every task the
    backbone will serve (images only are used): Taylor importance is measured on all of them
    together, and recovery distils on them. With ``output`` (a ``.safetensors`` path, checked
    before any work) the pruned backbone is written there (``save_pruned``, recording ``command``).
    """
    from petah.prune import PruneConfig, describe_changes, prune_model, recover
    from petah.prune.pruner import check_prunable, check_stage_ratios

    config = config or PruneConfig()
    if output is not None:
        if Path(output).suffix != ".safetensors":
            raise PetahError(f"the pruned backbone is a .safetensors file, got {output}")
        check_writable(output)

    family = backbone.family
    if backbone.pruned:
        raise PetahError(f"{backbone.describe()} is already pruned; prune the original backbone again at the new ratio")
    if family is None or not family.prunable:
        check_prunable(backbone.model)  # names an attention layer without a pruner, if there is one
        raise PetahError(f"petah cannot prune {backbone.name} (family {family.name if family else 'unknown'}); "
                         "supported: EfficientFormer, EfficientFormerV2, MobileNet and ResNet")
    check_stage_ratios(backbone.model, config, family.stage_of, backbone.name)  # before any work
    datasets = list(datasets or [])
    torch.manual_seed(config.seed)
    loaders = _image_loaders(backbone, datasets, config.batch_size, config.seed)
    policy = None
    if config.policy == "auto":
        config, policy = _auto_stage_ratios(backbone, config, loaders)
    example = torch.zeros(1, 3, backbone.img_size, backbone.img_size)
    model = copy.deepcopy(backbone.model)
    before = backbone_cost(backbone.model, backbone.img_size)
    report = prune_model(model, example, config, loaders, family.stage_of)
    if policy is not None:
        report["policy"] = policy
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
    if output is not None:
        save_pruned(pruned, report, output, command=command)
    return pruned, report


def _auto_stage_ratios(backbone: Backbone, config, loaders: list) -> tuple:
    """``--policy auto``: the probe on one batch of every task's images, then the choice
    (``petah.prune.policy``); returns the config with those stage ratios and the policy report."""
    from petah.prune.policy import POINTS_PER_DISTORTION, choose, probe_stages

    if not loaders:
        raise PetahError("--policy auto measures the tasks' features: give --data (repeat it per task)")
    started = time.monotonic()
    images = [next(iter(loader))[0] for loader in loaders]
    stages = sorted({backbone.family.stage_of(n) for n, m in backbone.model.named_modules()
                     if isinstance(m, nn.Conv2d | nn.Linear)})
    probes, complete = probe_stages(backbone.model, stages, images, backbone.family.stage_of, config.policy_seconds)
    chosen, spent, saving = choose(probes, stages, config.max_loss / POINTS_PER_DISTORTION)
    policy = {"probes": [p.to_dict() for p in probes], "complete": complete, "stage_ratios": chosen,
              "predicted_loss_points": round(spent * POINTS_PER_DISTORTION, 2),
              "predicted_latency_saving": round(saving, 3), "seconds": round(time.monotonic() - started, 1)}
    return replace(config, ratio=0.0, head_ratio=None, stage_ratios=dict(chosen), policy="uniform"), policy


def save_pruned(pruned: Backbone, report: dict, path: str | Path, *, command: str = "") -> Path:
    """Write a pruned backbone file: weights + the architecture + how it was pruned (JSON, no pickle)."""
    extra = {k: pruned.source[k] for k in ("source_data", "metrics") if k in pruned.source}
    extra.update({"pruning": {**report, "command": command}, "command": command,
                  "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")})
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
def evaluate(backbone: Backbone, package: TaskPackage | str | Path, data: LabeledImages, *, trust=None) -> dict:
    """The package's metrics on ``data``; ``trust`` (a ``petah.packages.TrustPolicy``): who must have signed it."""
    task = load_task(backbone, package, trust)
    kind = task.kind
    if kind is not kind_for_data(data):
        raise PetahError(f"package {task.name} is a {kind.kind} task; the evaluation data is labelled for "
                         f"{kind_for_data(data).kind}")
    if data.classes != task.classes:
        raise PetahError(f"the evaluation data's classes {data.classes[:4]}… differ from the package's "
                         f"{task.classes[:4]}…")
    return kind.evaluate(task.model, eval_loader(data, task.preprocess, kind), data.classes)


def open_runtime(backbone: Backbone, packages: list, trust=None):
    """A runtime holding every package once; two packages of the same task name are refused.
    ``trust`` (a ``petah.packages.TrustPolicy``): who must have signed them."""
    from petah.runtime import Runtime

    runtime = Runtime(backbone, trust=trust)
    for package in packages:
        loaded = len(runtime.tasks)
        task = runtime.load(package)
        if len(runtime.tasks) == loaded:  # load() replaced a task of that name
            raise PetahError(f"two packages are named task {task.name!r}; give each task its own name")
    return runtime


def _check_top_k(top_k: int) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise PetahError(f"top_k (--top-k) must be a whole number >= 1, got {top_k!r}")


def predict(backbone: Backbone, packages: list, images: list[torch.Tensor], *, top_k: int = 3,
            trust=None) -> dict[str, list[dict]]:
    """Per-task predictions for RGB uint8 image tensors, all packages on one resident backbone."""
    _check_top_k(top_k)
    return open_runtime(backbone, packages, trust).run(images, top_k=top_k)


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


def predict_files(backbone: Backbone, packages: list, paths: list[str | Path], *, top_k: int = 3,
                  out_dir: str | Path | None = None, keep_going: bool = True, trust=None):
    """An iterator of one JSON-ready result per image file, on one resident backbone. A bad file
    yields an error entry (``keep_going``) or, with ``keep_going=False``, fails the call before any
    file is written. With ``out_dir``, segmentation masks (class-index PNG + overlay) and
    detection overlays (boxes drawn) are written there; boxes are in the JSON either way.

    Bad options, bad packages and paths holding no image are refused when called, not when iterated.
    """
    from petah.data import load_image

    _check_top_k(top_k)
    files = image_files(paths)
    if not files:
        raise PetahError(f"no images found in {', '.join(map(str, paths)) or 'the paths given'}")
    if not keep_going:  # all or nothing: every file must read before the first result is written
        for path in files:
            load_image(path)
    runtime = open_runtime(backbone, packages, trust)
    return _predict_each(runtime, files, top_k, out_dir)


def _predict_each(runtime, files: list[Path], top_k: int, out_dir: str | Path | None):
    from petah.data.images import load_image_modes
    from petah.tasks.anomaly import save_anomaly_map, save_heatmap
    from petah.tasks.detection import save_box_overlay
    from petah.tasks.segmentation import save_mask, save_overlay

    names = _unique_stems(files)
    by_mode: dict[str, list[str]] = {}  # each task sees the image as its package was trained (intensity)
    for name, task in runtime.tasks.items():
        by_mode.setdefault(task.manifest.intensity, []).append(name)
    for path in files:
        try:
            images = load_image_modes(path, tuple(by_mode))
        except PetahError as exc:
            yield {"image": str(path), "error": str(exc)}
            continue
        tasks = {}
        outputs = [(name, preds, images[mode]) for mode, group in by_mode.items()
                   for name, preds in runtime.run([images[mode]], tasks=group, top_k=top_k).items()]
        for name, preds, image in outputs:
            result = dict(preds[0])
            mask = result.pop("mask", None)
            anomaly_map = result.pop("anomaly_map", None)  # a float map: written as images, never in the JSON
            if out_dir is not None and anomaly_map is not None:
                base = _output_base(out_dir, names[path], name)
                save_anomaly_map(anomaly_map, result["threshold"], f"{base}.anomaly.png")
                save_heatmap(image, anomaly_map, result["threshold"], f"{base}.heatmap.png")
                result.update({"anomaly_map": f"{base}.anomaly.png", "overlay": f"{base}.heatmap.png"})
            if out_dir is not None and (mask is not None or "boxes" in result):
                base = _output_base(out_dir, names[path], name)
                if mask is not None:
                    save_mask(mask, f"{base}.mask.png")
                    save_overlay(image, mask, f"{base}.overlay.png")
                    result.update({"mask": f"{base}.mask.png", "overlay": f"{base}.overlay.png"})
                if "boxes" in result:
                    save_box_overlay(image, result["boxes"], f"{base}.boxes.png")
                    result["overlay"] = f"{base}.boxes.png"
            tasks[name] = result
        yield {"image": str(path), "tasks": tasks}


def _output_base(out_dir: str | Path, stem: str, task: str) -> Path:
    """``OUT_DIR/STEM.TASK`` (the caller adds a suffix); a task name never leaves ``out_dir``."""
    base = Path(out_dir) / f"{stem}.{re.sub(r'[^A-Za-z0-9._-]', '_', task)}"
    base.parent.mkdir(parents=True, exist_ok=True)
    return base


def _unique_stems(files: list[Path]) -> dict[Path, str]:
    """Output names per input file: the stem, or the stem with a counter when two files share it."""
    seen: dict[str, int] = {}
    names = {}
    for path in files:
        count = seen.get(path.stem, 0)
        seen[path.stem] = count + 1
        names[path] = path.stem if count == 0 else f"{path.stem}-{count}"
    return names


inspect_package = describe_package  # the name the CLI and scripts know


__all__ = [
    "check_task", "check_writable", "eval_loader", "plan_summary", "preprocess_for", "resolve_backbone",
    "AdaptResult", "LoadedTask", "adapt", "attach_package", "build_package", "create_backbone", "evaluate",
    "fingerprint", "image_files", "inspect_backbone", "inspect_package", "load_task", "merged_backbone", "open_runtime",
    "planned_bytes",
    "predict", "predict_files", "prepare", "prune_backbone", "save_package",
    "save_pruned",
]


def plan_summary(backbone: Backbone, *, plan: PlanConfig | None = None, classes: int = 10,
                 targets: list | None = None) -> dict:
    """Which layers a plan adapts on ``backbone`` and what it trains — before any training, or as a
    package chose them (``targets``: its manifest's; a budget plan's ranks exist only there)."""
    from petah.plans import stage_function
    from petah.plans.budget import stage_summary

    plan = plan or PlanConfig()
    if plan.budget is not None and targets is None:
        raise PetahError("a --budget plan is chosen on the task's data by petah adapt; show the choice of a "
                         "package with petah plan show --package PKG (or petah inspect PKG)")
    work = replace(backbone, model=copy.deepcopy(backbone.model))
    adapter = TaskAdapter(work, plan, targets)
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
        "stages": stage_summary(adapter.targets, stage_function(backbone.name)),
        "adapter_parameters": trainable - owned, "owned_parameters": owned, "owned_tensors": len(adapter.override_keys),
        "head_parameters": head_params, "head_classes": classes,
        "backbone_parameters": backbone_params,
        "trainable_percent": round(100 * (trainable + head_params) / backbone_params, 3),
    }
