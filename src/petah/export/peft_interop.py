"""PEFT interoperability: a task as a PEFT LoRA folder, and such a folder as a ``.petah`` package.

A PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``) is what a user gets who
wires PEFT onto a timm classifier by hand: ``get_peft_model(timm.create_model(name,
num_classes=N), LoraConfig(..., modules_to_save=[classifier]))``. Both directions go through
PEFT itself (``get_peft_model`` / ``save_pretrained`` and ``PeftModel.from_pretrained``), so its
key layout and its target matching rules are PEFT's own, not re-implemented here.

What maps to what:
- LoRA targets ↔ LoRA (exact module names; per-stage ranks as ``rank_pattern`` / ``alpha_pattern``);
- petah's depthwise ChannelScale → ``modules_to_save`` holding the task's scaled kernel (PEFT
  has no per-channel scale that mixes with LoRA; the kernel copy is exact and small);
- task-owned tensors (norms, BitFit biases) ↔ ``modules_to_save`` of the modules that own them;
- the head ↔ the timm classifier module(s) (EfficientFormerV2 averages ``head`` and ``head_dist``
  at inference: both get the head, and on import their mean is the head).
On import, PEFT's scaling is folded into B (the package's plan has alpha = rank), so rsLoRA and
any rank / alpha patterns come across exactly. A ``petah_task.json`` beside the PEFT files keeps
labels and the backbone identity, so a round trip loses nothing.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn

from petah.adapters import TaskAdapter
from petah.adapters.model import lora_config
from petah.backbones import Backbone
from petah.errors import PetahError
from petah.files import check_writable, inside
from petah.packages import TaskPackage, TrustPolicy, read_package, read_trusted
from petah.plans import CHANNEL_SCALE, LORA, PlanConfig, Target
from petah.plans.base import MAGNITUDE
from petah.runtime.attach import build_package, load_task
from petah.tasks import Classification

TASK_FILE = "petah_task.json"
PEFT_ADAPTER = "default"  # PEFT's adapter name in a single-adapter folder
PEFT_PREFIX = "base_model.model."


def classifier_names(backbone: Backbone) -> list[str]:
    names = backbone.model.pretrained_cfg.get("classifier")
    if not names:
        raise PetahError(f"timm names no classifier for {backbone.name}; PEFT folders need one for the head")
    return [names] if isinstance(names, str) else list(names)


def _with_classifier(backbone: Backbone, classes: int) -> tuple[nn.Module, list[str]]:
    """A copy of the backbone's model with timm's own classifier(s) for ``classes`` outputs."""
    model = copy.deepcopy(backbone.model)
    model.reset_classifier(classes)
    names = classifier_names(backbone)
    for name in names:
        if not isinstance(model.get_submodule(name), nn.Linear):
            raise PetahError(f"{backbone.name}'s classifier {name} is not a Linear layer; petah heads are")
    return model, names


def _test_inputs(backbone: Backbone) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, backbone.img_size, backbone.img_size, generator=gen)


@torch.no_grad()
def _max_error(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    return float((a.eval()(x) - b.eval()(x)).abs().max())


PARITY = 1e-3  # max |Δ| of logits between petah and PEFT on the test inputs


def _check_parity(error: float, what: str, tolerance: float = PARITY) -> None:
    if not error <= tolerance:
        raise PetahError(f"{what} differs from the other side by {error:.2e} (> {tolerance:g}); not written")


def _replace_dir(tmp: Path, output: Path) -> None:
    """Move a finished folder into place; an older one at ``output`` goes only after that."""
    old = None
    if output.exists():
        if not (output / "adapter_config.json").is_file() and any(output.iterdir()):
            raise PetahError(f"{output} exists and is not a PEFT adapter folder; "
                             "choose a new folder (it is never overwritten)")
        old = output.with_name(f".{output.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        output.rename(old)
    tmp.rename(output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_peft(backbone: Backbone, package: TaskPackage | str | Path, output: str | Path) -> dict:
    """Write a task as a PEFT LoRA folder; checks that PEFT's model gives the task's outputs."""
    from peft import get_peft_model

    origin = str(package) if not isinstance(package, TaskPackage) else package.task_name
    package = package if isinstance(package, TaskPackage) else read_package(package)
    manifest = package.manifest
    plan = manifest.plan
    config = plan.plan_config()
    if manifest.task.kind != "classification":
        raise PetahError(f"{origin}: a {manifest.task.kind} task; a PEFT folder carries timm's classifier as the head, "
                         "so only classification exports")
    if config.preset == "full":
        raise PetahError(f"{origin}: a full fine-tune is not an adapter; export it merged to ONNX instead")
    targets = list(plan.targets)
    peft_config = lora_config(targets, config)
    if peft_config is None:
        raise PetahError(f"{origin}: plan {config.preset} has no LoRA layers, which PEFT's LoRA format needs")
    scaled = [t.module for t in targets if t.method == CHANNEL_SCALE]
    owners = sorted({key.rpartition(".")[0] for key in plan.overrides})
    lora_modules = {t.module for t in targets if t.method == LORA}
    if lora_modules & set(owners):
        raise PetahError(f"{origin}: module {sorted(lora_modules & set(owners))[0]} has both LoRA and owned tensors; "
                         "PEFT cannot express that")

    task = load_task(backbone, package)
    adapters = task.adapter.adapter_state()
    task.adapter.merge()  # the scaled depthwise kernels, and the task's own norm tensors, as plain weights
    weights = {k: v.clone() for k, v in task.adapter.backbone_weights().items()}  # unmerge works in place
    task.adapter.unmerge()

    model, classifiers = _with_classifier(backbone, len(manifest.labels))
    peft_config.modules_to_save = classifiers + scaled + owners
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*modules_to_save.*")
        peft_model = get_peft_model(model, peft_config)
    inner = peft_model.base_model.model
    with torch.no_grad():
        for module in lora_modules:
            layer = inner.get_submodule(module)
            layer.lora_A[PEFT_ADAPTER].weight.copy_(adapters[f"{module}.lora_A"])
            layer.lora_B[PEFT_ADAPTER].weight.copy_(adapters[f"{module}.lora_B"])
            if config.dora:  # stored flat; PEFT holds a conv's as (1, out, 1, 1)
                magnitude = layer.lora_magnitude_vector[PEFT_ADAPTER].weight
                magnitude.copy_(adapters[f"{module}.{MAGNITUDE}"].reshape(magnitude.shape))
        head = task.model.head.state_dict()
        for module in classifiers:
            inner.get_submodule(module).modules_to_save[PEFT_ADAPTER].load_state_dict(head)
        for module in scaled + owners:
            copy_ = inner.get_submodule(module).modules_to_save[PEFT_ADAPTER]
            copy_.load_state_dict({k: weights[f"{module}.{k}"] for k in copy_.state_dict()})
    error = _max_error(peft_model, task.model, _test_inputs(backbone))
    _check_parity(error, f"{origin}: PEFT's model")

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        peft_model.save_pretrained(str(tmp))
        info = {"task": manifest.task.to_dict(), "backbone": manifest.backbone.to_dict(),
                "preprocessing": manifest.preprocessing,
                "timm_model": {"name": backbone.name, "num_classes": len(manifest.labels),
                               "img_size": backbone.img_size}}
        (tmp / TASK_FILE).write_text(json.dumps(info, indent=1))
        _replace_dir(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = {p.name: p.stat().st_size for p in sorted(output.iterdir())}
    return {"task": manifest.task.name, "folder": str(output), "files": files,
            "modules_to_save": peft_config.modules_to_save, "max_abs_error": error}


def _read_peft_folder(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config_path, weights_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise PetahError(f"{folder} is not a PEFT adapter folder: {path.name} is missing")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise PetahError(f"{config_path}: not valid JSON ({exc})") from exc
    if config.get("peft_type") != "LORA":
        raise PetahError(f"{config_path}: peft_type {config.get('peft_type')!r}; petah imports LoRA adapters only")
    if config.get("use_dora"):  # petah's own DoRA packages export to PEFT; importing one is not built
        raise PetahError(f"{config_path}: importing DoRA adapters is not supported (petah adapt --dora trains them)")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise PetahError(f"{config_path}: trained biases (bias={config.get('bias')!r}, lora_bias) "
                         "have no petah equivalent")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise PetahError(f"{weights_path}: not a readable safetensors file ({exc})") from exc
    return config, tensors


def _read_task_file(folder: Path) -> dict:
    """petah's side file of a PEFT folder (labels, backbone identity), checked: it is untrusted input."""
    path = folder / TASK_FILE
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text())
        ok = isinstance(info, dict) and isinstance(info.get("task", {}), dict) and \
            isinstance(info["backbone"]["fingerprint"], str)
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise PetahError(f"{path}: not a petah task file (a JSON object with task and backbone.fingerprint)")
    return info


def import_peft(backbone: Backbone, folder: str | Path, task_name: str | None = None,
                labels: list[str] | None = None, adapter_dtype: str = "float16") -> tuple[TaskPackage, dict]:
    """Turn a PEFT LoRA folder trained on ``backbone``'s timm model into a task package."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    folder = Path(folder)
    _, tensors = _read_peft_folder(folder)
    info = _read_task_file(folder)
    if info and info["backbone"]["fingerprint"] != backbone.fingerprint:
        trained = info["backbone"]
        raise PetahError(f"{folder} was trained on {trained.get('name')}@{trained.get('img_size')} "
                         f"({trained['fingerprint'][:12]}), not on {backbone.name}@{backbone.img_size} "
                         f"({backbone.fingerprint[:12]})")
    classifiers = classifier_names(backbone)
    saved = [c for c in classifiers if f"{PEFT_PREFIX}{c}.weight" in tensors]
    if saved != classifiers:
        wanted = ", ".join(classifiers)
        raise PetahError(f"{folder}: the trained classifier ({wanted}) must be in modules_to_save; found "
                         f"{', '.join(saved) or 'none'}")
    classes = int(tensors[f"{PEFT_PREFIX}{classifiers[0]}.weight"].shape[0])
    labels = labels or info.get("task", {}).get("labels") or [str(i) for i in range(classes)]
    if len(labels) != classes:
        raise PetahError(f"{folder}: the classifier has {classes} outputs but {len(labels)} labels were given")

    model, _ = _with_classifier(backbone, classes)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(modules_to_save|Found missing adapter keys).*")
            peft_model = PeftModel.from_pretrained(model, str(folder))
    except (RuntimeError, ValueError, KeyError) as exc:
        raise PetahError(f"{folder} does not fit {backbone.name}@{backbone.img_size}: "
                         f"{str(exc).splitlines()[0]}") from exc
    loaded = {PEFT_PREFIX + k.replace(f".{PEFT_ADAPTER}.", ".").replace(".modules_to_save.", ".")
              for k in peft_model.base_model.model.state_dict()}
    missing = sorted(k for k in tensors if k not in loaded)
    if missing:
        raise PetahError(f"{folder}: tensor {missing[0]} names no layer of {backbone.name}")

    inner = peft_model.base_model.model
    targets, adapters, owned, overrides = [], {}, [], {}
    head = Classification.build_head(backbone.num_features, classes)
    head_weights = []
    for name, layer in inner.named_modules():
        if isinstance(layer, LoraLayer) and PEFT_ADAPTER in layer.lora_A:
            rank = int(layer.r[PEFT_ADAPTER])
            adapters[f"{name}.lora_A"] = layer.lora_A[PEFT_ADAPTER].weight.detach().clone()
            adapters[f"{name}.lora_B"] = layer.lora_B[PEFT_ADAPTER].weight.detach() * layer.scaling[PEFT_ADAPTER]
            targets.append(Target(name, LORA, rank))
        elif isinstance(layer, ModulesToSaveWrapper):
            state = layer.modules_to_save[PEFT_ADAPTER].state_dict()
            if name in classifiers:
                head_weights.append(state)
            else:
                owned.append(name)
                overrides.update({f"{name}.{k}": v.detach().clone() for k, v in state.items()})
    if not targets:
        raise PetahError(f"{folder}: PEFT attached no LoRA layer to {backbone.name}")
    head.load_state_dict({k: torch.stack([w[k] for w in head_weights]).mean(0) for k in head.state_dict()})

    rank = max(t.rank for t in targets)
    plan = PlanConfig(preset="petah", rank=rank, alpha=rank,  # scaling 1: PEFT's scaling is in B
                      targets=["^(?:" + "|".join(re.escape(t.module) for t in targets) + ")$"], override_modules=owned)
    work = replace(backbone, model=copy.deepcopy(backbone.model))
    adapter = TaskAdapter(work, plan, targets=targets)
    adapter.load_state(adapters, overrides)
    task_name = task_name or info.get("task", {}).get("name") or folder.name
    package = build_package(backbone, adapter, head, task_name=task_name, labels=labels, adapter_dtype=adapter_dtype,
                            extra={"source": {"peft_folder": folder.name, "backbone_checked": bool(info)}})
    error = _max_error(peft_model, load_task(backbone, package).model, _test_inputs(backbone))
    # adapters stored in 16 bits round B·A to ~3 significant digits
    _check_parity(error, f"{folder}: the package", tolerance=5e-2 if adapter_dtype != "float32" else PARITY)
    return package, {"task": task_name, "lora_layers": len(targets), "owned_modules": owned,
                     "classes": classes, "backbone_checked": bool(info), "max_abs_error": error}


def export_peft_folders(backbone: Backbone, packages: list, folder: str | Path,
                        trust: TrustPolicy | None = None) -> list[dict]:
    """Several tasks as PEFT LoRA folders: ``folder`` itself for one package, ``folder/<task>`` for
    several (two packages of one task name, or one ``trust`` refuses, are refused before anything
    is written)."""
    check_writable(Path(folder) / TASK_FILE)
    loaded = [read_trusted(package, trust)[0] for package in packages]
    names = [package.task_name for package in loaded]
    if len({n.casefold() for n in names}) != len(names):  # folders a and A collide on case-insensitive disks
        raise PetahError(f"two packages share a task name ({', '.join(names)}); export them one at a time")
    folder = Path(folder)
    # task names are validated on read; ``inside`` keeps even a future bug from writing elsewhere
    return [export_peft(backbone, package, folder if len(loaded) == 1 else inside(folder, package.task_name))
            for package in loaded]
