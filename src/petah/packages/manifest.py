"""The package manifest, typed: what a ``.petah`` file records about its task, validated on read.

Everything in a manifest is untrusted input (a package may come from anywhere): ``Manifest.from_dict``
checks the structure, the types and the cross-field facts (labels vs head outputs, task names
that are safe as file names) and names the file in a one-line error. ``docs/format.md`` is the
reference for third-party readers; the field names here are that contract.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from petah import __version__
from petah.errors import PetahError
from petah.imaging import Preprocess
from petah.packages.quantized import QUANTIZED_DTYPES, scale_names
from petah.plans import CHANNEL_SCALE, LORA, MAX_RANK, PlanConfig, Target
from petah.plans.base import LORA_FORMS, MAGNITUDE

FORMAT = "petah-task"
# the newest: v3 + adapter forms an older reader would merge wrongly: LoRA factors stored in int8
# with their scales (petah.packages.quantized), rsLoRA's per-layer scaling and DoRA's magnitudes
# (plan.config.rslora / dora)
FORMAT_VERSION = 4
GRAPH_VERSION = 3  # v2 + a head graph (``graph/head``) for heads a device runs as a graph
FORMS_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
CURRENT_VERSIONS = (2, 3, 4)  # hashed manifests: signable; each package is written in the oldest version it needs
GRAPH_TENSOR = "graph/head"
HASH_FIELD = "content_sha256"  # v2: covers the manifest (all but this field) and the tensors
V1_HASH_FIELD = "payload_sha256"  # v1: covered the tensors only
TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MODULE_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
MAX_LABELS = 100_000
MAX_LABEL_CHARS = 200
MAX_HEAD_LIST = 16  # strides, channels, grids: a handful per head
MAX_HEAD_NUMBER = MAX_LABELS  # any width or count a head description declares (shapes are checked on attach)
METHODS = (LORA, CHANNEL_SCALE)
# the task kinds a package may hold (petah.tasks implements each; a test keeps the two equal)
TASK_KIND_NAMES = ("classification", "segmentation", "detection", "anomaly")
ADAPTER_DTYPES = ("float16", "bfloat16", "float32", *QUANTIZED_DTYPES)  # how adapter tensors may be stored
CORE_FIELDS = ("format", "format_version", "petah_version", "task", "backbone", "preprocessing", "plan", "head",
               "adapter_dtype", "trainable_parameters", "metrics", "training", "created_at", HASH_FIELD, V1_HASH_FIELD)


def canonical_json(value: Any) -> bytes:
    """The one byte form that is hashed: keys sorted, no whitespace, UTF-8, no NaN / Infinity."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except ValueError as exc:
        raise PetahError(f"a manifest value cannot be stored: {exc}") from exc


def check_task_name(name: object, origin: str | None = None) -> str:
    """A task name is a file or folder name on export and on the device: one safe path component."""
    if not isinstance(name, str) or TASK_NAME.fullmatch(name) is None:
        where = f"{origin}: " if origin else ""
        raise PetahError(f"{where}task name {name!r} is not allowed; use 1-64 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    return name


class _Fields:
    """Typed access to one JSON object of the manifest, with one-line errors naming the file and field."""

    def __init__(self, data: object, where: str, origin: str):
        if not isinstance(data, dict):
            raise PetahError(f"{origin}: manifest {where or 'root'} must be a JSON object, got {type(data).__name__}")
        self.data, self.where, self.origin = data, where, origin

    def fail(self, key: str, want: str) -> PetahError:
        name = ".".join(part for part in (self.where, key) if part) or "root"
        return PetahError(f"{self.origin}: manifest field {name} must be {want}")

    def get(self, key: str, kind: type | tuple[type, ...], want: str, default: Any = ...) -> Any:
        if key not in self.data:
            if default is ...:
                raise PetahError(f"{self.origin}: manifest field "
                                 f"{self.where}{'.' if self.where else ''}{key} is missing")
            return default
        value = self.data[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
            raise self.fail(key, want)
        return value

    def text(self, key: str, default: Any = ...) -> str:
        return self.get(key, str, "a string", default)

    def count(self, key: str, default: Any = ..., minimum: int = 0) -> int:
        value = self.get(key, int, f"an integer >= {minimum}", default)
        if value < minimum:
            raise self.fail(key, f"an integer >= {minimum}")
        return value

    def obj(self, key: str, default: Any = ...) -> dict:
        return self.get(key, dict, "a JSON object", default)

    def strings(self, key: str, limit: int, chars: int) -> list[str]:
        values = self.get(key, list, "a list of strings")
        if len(values) > limit or not all(isinstance(v, str) and 0 < len(v) <= chars for v in values):
            raise self.fail(key, f"a list of at most {limit:,} non-empty strings of at most {chars} characters")
        return values

    def nested(self, key: str) -> _Fields:
        where = f"{self.where}{'.' if self.where else ''}{key}"
        return _Fields(self.get(key, dict, "a JSON object"), where, self.origin)


def _is_number(value: object) -> bool:
    """A finite JSON number a float can hold (a 400-digit integer is not one)."""
    if type(value) is int:
        return abs(value) <= 2**53
    return type(value) is float and math.isfinite(value)


def _head_value(value: object) -> bool:
    """What a head description may hold: bounded, so building its layers cannot run away
    (their shapes are compared with the stored tensors before any real allocation)."""
    if isinstance(value, str):
        return len(value) <= 300
    if isinstance(value, list):
        return len(value) <= MAX_HEAD_LIST and all(type(v) is int and 0 <= v <= MAX_HEAD_NUMBER for v in value)
    return _is_number(value) and abs(value) <= MAX_HEAD_NUMBER


def _check_plan_config(config: _Fields) -> None:
    """The recipe is re-read on attach (PlanConfig.from_dict): check its types first."""
    for key in ("targets", "override_modules"):
        if key in config.data:
            for pattern in config.strings(key, 1_000, 20_000):  # import-peft joins every module name into one
                try:
                    re.compile(pattern)
                except re.error:
                    raise config.fail(key, f"valid regular expressions, not {pattern[:40]!r}") from None
    stages = config.get("stage_ranks", dict, "an object of stage -> rank", {})
    if not all(str(k).isdigit() and type(v) is int and 0 <= v <= MAX_RANK for k, v in stages.items()):
        raise config.fail("stage_ranks", f"an object of stage -> rank (0..{MAX_RANK})")
    try:
        PlanConfig.from_dict(config.data)
    except Exception as exc:  # any failure of an untrusted recipe is a refusal, named
        raise config.fail("", f"a valid plan ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") \
            from None


def _choice(fields: _Fields, key: str, choices: tuple[str, ...], default: str) -> str:
    value = fields.text(key, default)
    if value not in choices:
        raise fields.fail(key, f"one of {', '.join(choices)}")
    return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


@dataclass(frozen=True)
class TaskInfo:
    name: str
    kind: str
    labels: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "labels": list(self.labels)}


@dataclass(frozen=True)
class BackboneRef:
    """The backbone a package was trained on: name, input size and weight fingerprint."""

    name: str
    img_size: int
    fingerprint: str
    weights_bytes: int = 0
    pruned: bool = False

    def describe(self) -> str:
        return f"{'pruned ' if self.pruned else ''}{self.name}@{self.img_size}px (fingerprint {self.fingerprint[:12]})"

    def to_dict(self) -> dict:
        return {"name": self.name, "img_size": self.img_size, "fingerprint": self.fingerprint,
                "weights_bytes": self.weights_bytes, "pruned": self.pruned}


@dataclass(frozen=True)
class PlanRecord:
    """The plan's recipe and its resolved layers: ``targets`` are stable ``[module, method, rank]`` triples."""

    config: dict
    targets: tuple[Target, ...]
    overrides: tuple[str, ...]

    def plan_config(self) -> PlanConfig:
        return PlanConfig.from_dict(self.config)

    def to_dict(self) -> dict:
        return {"config": self.config, "targets": [[t.module, t.method, t.rank] for t in self.targets],
                "overrides": list(self.overrides)}


@dataclass
class Manifest:
    task: TaskInfo
    backbone: BackboneRef
    preprocessing: dict
    plan: PlanRecord
    head: dict  # the task kind's head description (kind-specific keys) + "tensors"
    adapter_dtype: str = "float32"
    trainable_parameters: int = 0
    metrics: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    created_at: str | None = None
    petah_version: str = __version__
    format_version: int = 2
    content_sha256: str | None = None
    extra: dict = field(default_factory=dict)  # fields this petah does not know: kept (and hashed) as they are

    def written_version(self) -> int:
        """The version this manifest is written as: v4 only where it needs v4 (int8 adapters, rsLoRA
        scaling, DoRA), v3 only where it needs v3 (a head graph), so stations of older petahs keep reading
        every other package (and refuse, not misread, the rest)."""
        if self.adapter_dtype in QUANTIZED_DTYPES or any(self.plan.config.get(form) for form in LORA_FORMS):
            return FORMS_VERSION
        return GRAPH_VERSION if self.head.get("graph") else 2

    @property
    def labels(self) -> list[str]:
        return list(self.task.labels)

    @property
    def intensity(self) -> str:
        """How the task's images deeper than 8 bits became 8-bit (``Preprocess`` knows the default of
        packages that predate the field)."""
        return Preprocess.from_dict(self.preprocessing).intensity

    def tensor_names(self) -> set[str]:
        """Every tensor the package must hold for this manifest."""
        names = set()
        for target in self.plan.targets:
            suffixes = ("lora_A", "lora_B") if target.method == LORA else ("scale_delta",)
            names |= {f"adapter/{target.module}.{s}" for s in suffixes}
            if target.method == LORA and self.adapter_dtype in QUANTIZED_DTYPES:
                names |= {f"adapter/{name}" for name in scale_names(target.module)}
            if target.method == LORA and self.plan.config.get("dora"):
                names.add(f"adapter/{target.module}.{MAGNITUDE}")
        names |= {f"override/{k}" for k in self.plan.overrides}
        names |= {f"head/{k}" for k in self.head["tensors"]}
        if self.head.get("graph"):
            names.add(GRAPH_TENSOR)
        return names

    def to_dict(self, with_hash: bool = True) -> dict:
        data = {
            **self.extra,
            "format": FORMAT, "format_version": self.format_version, "petah_version": self.petah_version,
            "task": self.task.to_dict(), "backbone": self.backbone.to_dict(), "preprocessing": self.preprocessing,
            "plan": self.plan.to_dict(), "head": self.head, "adapter_dtype": self.adapter_dtype,
            "trainable_parameters": self.trainable_parameters, "metrics": self.metrics, "training": self.training,
            "created_at": self.created_at,
        }
        if with_hash and self.content_sha256 is not None:
            data[HASH_FIELD] = self.content_sha256
        return data

    @classmethod
    def from_dict(cls, data: object, origin: str = "package") -> Manifest:
        """Validate an untrusted manifest (v1 or v2) and type it; a one-line PetahError names what is wrong."""
        root = _Fields(data, "", origin)
        version = root.data.get("format_version")
        if type(version) is not int or version not in READABLE_VERSIONS:
            raise PetahError(f"{origin}: unknown package format version {version!r} "
                             f"(this petah reads {', '.join(map(str, READABLE_VERSIONS))})")
        task_fields = root.nested("task")
        kind = task_fields.text("kind")
        if kind not in TASK_KIND_NAMES:
            raise task_fields.fail("kind", f"one of {', '.join(TASK_KIND_NAMES)}")
        task = TaskInfo(check_task_name(task_fields.text("name"), origin), kind,
                        tuple(task_fields.strings("labels", MAX_LABELS, MAX_LABEL_CHARS)))

        bb = root.nested("backbone")
        fingerprint = bb.text("fingerprint")
        if re.fullmatch(r"[0-9a-f]{64}", fingerprint) is None:
            raise bb.fail("fingerprint", "a sha256 in hex")
        backbone = BackboneRef(bb.text("name"), bb.count("img_size", minimum=1), fingerprint,
                               bb.count("weights_bytes", default=0), bb.get("pruned", bool, "true or false", False))

        preprocessing = root.obj("preprocessing")
        pre = root.nested("preprocessing")
        if pre.count("img_size", minimum=1) != backbone.img_size:
            raise pre.fail("img_size", f"the backbone's input size {backbone.img_size}")
        for key, low in (("mean", -math.inf), ("std", 0.0)):
            values = pre.get(key, list, "a list of 3 finite numbers")
            if len(values) != 3 or not all(_is_number(v) and low < v < math.inf for v in values):
                raise pre.fail(key, "a list of 3 finite numbers" + (" > 0" if key == "std" else ""))
        try:
            Preprocess.from_dict(preprocessing)  # the intensity mode and anything else it reads
        except (KeyError, TypeError, ValueError, PetahError) as exc:
            raise root.fail("preprocessing", f"valid preprocessing ({str(exc).splitlines()[0]})") from None

        plan_fields = root.nested("plan")
        config = plan_fields.obj("config")
        _check_plan_config(plan_fields.nested("config"))
        targets = []
        for item in plan_fields.get("targets", list, "a list of [module, method, rank] triples"):
            if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str)
                    and MODULE_NAME.fullmatch(item[0]) and item[1] in METHODS
                    and type(item[2]) is int and 0 <= item[2] <= MAX_RANK):
                raise plan_fields.fail("targets", f"[module, method ({' | '.join(METHODS)}), rank 0..{MAX_RANK}] "
                                                  f"triples, got {json.dumps(item)[:80]}")
            targets.append(Target(item[0], item[1], item[2]))
        overrides = plan_fields.strings("overrides", 100_000, 300)
        if len({t.module for t in targets}) != len(targets):
            raise plan_fields.fail("targets", "one triple per module")

        head = root.obj("head")
        head_fields = _Fields(head, "head", origin)
        head_fields.strings("tensors", 1_000, 300)
        for key, value in head.items():
            if key != "tensors" and not _head_value(value):
                raise head_fields.fail(key, f"a string, a finite number up to {MAX_HEAD_NUMBER:,} or a list of at most "
                                            f"{MAX_HEAD_LIST} such numbers")
        outputs = head_fields.count("out_features", minimum=1)
        if outputs != len(task.labels):
            raise PetahError(f"{origin}: the manifest names {len(task.labels)} label(s) "
                             f"for a head of {outputs} outputs")

        known = {k: v for k, v in root.data.items() if k not in CORE_FIELDS}
        adapter_dtype = _choice(root, "adapter_dtype", ADAPTER_DTYPES, "float32")
        if adapter_dtype in QUANTIZED_DTYPES and version < FORMS_VERSION:
            raise root.fail("adapter_dtype", f"a float type in a format-{version} package ({adapter_dtype} "
                                             f"adapters are format {FORMS_VERSION})")
        for form in LORA_FORMS:
            if config.get(form) is not None and (type(config[form]) is not bool or version < FORMS_VERSION):
                raise plan_fields.fail(f"config.{form}", f"true or false, in a package of format {FORMS_VERSION}")
        return cls(
            task=task, backbone=backbone, preprocessing=preprocessing,
            plan=PlanRecord(config, tuple(targets), tuple(overrides)), head=head,
            adapter_dtype=adapter_dtype,
            trainable_parameters=root.count("trainable_parameters", default=0),
            metrics=root.obj("metrics", {}), training=root.obj("training", {}),
            created_at=root.get("created_at", (str, type(None)), "a string", None),
            petah_version=root.text("petah_version", "unknown"), format_version=version,
            content_sha256=root.get(HASH_FIELD, str, "a sha256 in hex", None), extra=known,
        )
