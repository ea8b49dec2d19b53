"""Adapter plans: which backbone layers a task adapts, with which method and rank.

A family (one file each in this folder) names its layers by *role* with regular expressions:
``attn`` (attention projections), ``mlp`` (MLP / pointwise layers), ``conv`` (dense k x k
convolutions such as stem and downsampling). Depthwise convolutions are found by type.
A preset then says which roles get low-rank adapters; the resolved plan is a flat list of
``Target(module, method, rank)`` that is stored in every package, so loading never has to
re-derive it.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from petah.errors import PetahError
from petah.options import option, parse_stage_values, require_positive
from petah.plans.budget import BUDGET_FORMS, check_budget

LORA = "lora"
CHANNEL_SCALE = "channel_scale"

PRESETS = ("petah", "attn-lora", "bitfit", "linear-probe", "full")
TASK_NORM_CHOICES = ("none", "affine", "stats")
ALLOCATIONS = ("gradient", "activation")
LORA_FORMS = ("rslora", "dora")  # plan switches that change how LoRA layers merge (package format 4)
LORA_INITS = ("default", "eva")  # how A starts (petah.train.eva); merging is the same either way
MAGNITUDE = "lora_magnitude"  # DoRA's per-row magnitude of a LoRA layer, as a package stores it
DEFAULT_RANK = 8
DEFAULT_MAX_RANK = 32


@dataclass(frozen=True)
class Family:
    """What petah knows about one timm model family."""

    name: str
    models: str  # regex over timm model names
    roles: dict[str, str]  # role -> regex over module names
    stage: str | None = None  # regex whose first group is the stage index of a module
    fixed_img_size: int | None = None  # the family ignores img_size (EfficientFormer V1)
    img_size_kwarg: bool = False  # the input size is fixed when the model is built
    img_size_multiple: int = 32
    has_attention: bool = True
    prunable: bool = False  # petah prune handles it (Torch-Pruning + petah's attention pruners)

    def matches(self, model_name: str) -> bool:
        return re.match(self.models, model_name) is not None

    def stage_of(self, module_name: str) -> int:
        if self.stage is None:
            return 0
        found = re.search(self.stage, module_name)
        return int(found.group(1)) if found else 0


# The largest LoRA rank a plan accepts. The hybrids petah adapts have layers of at most a few
# hundred channels, and a rank only pays while it is small next to them; a larger number is a typo
# (``--rank 100000`` would otherwise allocate until memory runs out).
MAX_RANK = 256


def _whole(value: str) -> int:
    if not value.isdigit():
        raise ValueError(value)
    return int(value)


def parse_stage_ranks(items: list[str] | dict | None) -> dict[int, int]:
    """``["0=0", "3=16"]`` (the CLI's repeated STAGE=RANK) as ``{0: 0, 3: 16}``; a dict passes through."""
    return parse_stage_values(items, "--stage-rank", _whole, "RANK", "0=0 to leave stage 0 unadapted")


@dataclass
class PlanConfig:
    """A task's adaptation recipe; stored in the package manifest. Its fields are the CLI's plan options."""

    preset: str = option("petah", help="petah | attn-lora | bitfit | linear-probe | full", cli="--plan")
    rank: int = option(DEFAULT_RANK, help=f"LoRA rank (1 to {MAX_RANK}).", cli="--rank")
    alpha: float | None = option(None, help="LoRA alpha (default 2 x rank).", cli="--alpha")
    stage_ranks: dict[int, int] = option(
        default_factory=dict, help="Per-stage rank, STAGE=RANK; 0 leaves a stage unadapted. Repeatable.",
        cli="--stage-rank", cli_type=list[str], parse=parse_stage_ranks)
    # none | affine (task-owned norm affine) | stats (affine + running stats). "none" by measurement:
    # on the demo tasks "stats" helps only under a large domain shift and doubles the package.
    task_norm: str = option("none", help="none | affine | stats: what of the norm layers the task owns.",
                            cli="--task-norm")
    targets: list[str] = option(default_factory=list, cli="--target", cli_type=list[str],
                                help="Regex naming layers to adapt (a generic plan for any timm model). Repeatable.")
    dropout: float = option(0.0, help="LoRA dropout, in [0, 1).", cli="--dropout")
    # rsLoRA (Kalajievski 2023): every layer's update is scaled by alpha / sqrt(its rank) instead of
    # petah's alpha / rank with alpha kept proportional to each layer's rank (one scaling for all)
    rslora: bool = option(False, cli="--rslora", help=(
        "Rank-stabilised scaling (rsLoRA): each layer's update is scaled by alpha / sqrt(its rank)."))
    # DoRA (Liu et al. 2024, PEFT's use_dora): a LoRA layer's weight is split into a trained per-row
    # magnitude and a direction that LoRA changes; merges exactly (each row rescaled)
    dora: bool = option(False, cli="--dora", help=(
        "DoRA: each LoRA layer also trains a magnitude per output row (weight-decomposed LoRA)."))
    lora_init: str = option("default", cli="--lora-init", help=(
        "How LoRA's A starts: default (PEFT's random A) | eva (the top principal directions of each "
        "layer's inputs on the training data). B starts at zero either way."))
    # modules whose every tensor the task owns (PEFT's modules_to_save, kept by import-peft; the
    # norm layers a budget allocation gives the task)
    override_modules: list[str] = option(default_factory=list, help="Modules whose every tensor the task owns.")
    budget: str | None = option(None, cli="--budget", help=(
        f"Bytes the package may take: {BUDGET_FORMS}. The plan's layers then get each their own "
        "rank (0 = not adapted), channel scale or not, and the task owns the norm layers that pay, "
        "chosen by a short probe on the training data. Default: 3% for classification; a uniform --rank "
        "plan for the other kinds, and for any task given --plan, --rank, --stage-rank, --task-norm or --target."))
    max_rank: int = option(DEFAULT_MAX_RANK, cli="--max-rank",
                           help="With --budget: the largest rank any one layer may get.")
    allocation: str = option("gradient", cli="--allocation", help=(
        "With --budget: how layers are valued. gradient (the loss gradient's energy a rank captures, after "
        "a short head warm-up) | activation (EVA-style: the input variance a rank explains; no labels)."))

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise PetahError(f"unknown plan {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if self.task_norm not in TASK_NORM_CHOICES:
            raise PetahError(
                f"unknown task_norm {self.task_norm!r}; choose one of {', '.join(TASK_NORM_CHOICES)}"
            )
        if self.rank < 1:
            raise PetahError(f"rank must be >= 1, got {self.rank}")
        if self.rank > MAX_RANK:
            raise PetahError(f"rank must be at most {MAX_RANK}, got {self.rank}")
        require_positive("alpha", self.alpha)
        if not 0 <= self.dropout < 1:
            raise PetahError(f"dropout must be in [0, 1), got {self.dropout}")
        self.stage_ranks = {int(k): int(v) for k, v in parse_stage_ranks(self.stage_ranks).items()}
        for stage, rank in self.stage_ranks.items():
            if stage < 0 or not 0 <= rank <= MAX_RANK:
                raise PetahError(f"--stage-rank {stage}={rank}: the stage must be >= 0 and the rank 0 to {MAX_RANK}")
        if self.allocation not in ALLOCATIONS:
            raise PetahError(f"unknown --allocation {self.allocation!r}; choose one of {', '.join(ALLOCATIONS)}")
        if not 1 <= self.max_rank <= MAX_RANK:
            raise PetahError(f"--max-rank must be 1 to {MAX_RANK}, got {self.max_rank}")
        if self.lora_init not in LORA_INITS:
            raise PetahError(f"unknown --lora-init {self.lora_init!r}; choose one of {', '.join(LORA_INITS)}")
        lora_forms = [f"--{form}" for form in LORA_FORMS if getattr(self, form)]
        lora_forms += ["--lora-init eva"] * (self.lora_init != "default")
        if lora_forms and self.preset in ("bitfit", "linear-probe", "full"):
            raise PetahError(f"{lora_forms[0]} changes LoRA layers; --plan {self.preset} has none")
        if self.budget is not None:
            self._check_budget()

    def _check_budget(self) -> None:
        """A budget chooses every rank itself: options that fix ranks contradict it."""
        self.budget = check_budget(self.budget)
        if self.preset != "petah":
            raise PetahError(f"--budget allocates the petah plan's layers; it does not apply to --plan {self.preset}")
        if self.stage_ranks:
            raise PetahError("--budget chooses each layer's rank; drop --stage-rank (cap ranks with --max-rank)")
        if self.rank != DEFAULT_RANK:
            raise PetahError("--budget chooses each layer's rank; drop --rank (cap ranks with --max-rank)")
        if self.task_norm != "none":
            raise PetahError("--budget chooses which norm layers the task owns; drop --task-norm")

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha) if self.alpha is not None else 2.0 * self.rank

    def to_dict(self) -> dict:
        data = asdict(self)
        data["stage_ranks"] = {str(k): v for k, v in self.stage_ranks.items()}
        for form in LORA_FORMS:  # absent unless used: packages without them stay readable by older petahs
            if not data[form]:
                del data[form]
        if data["lora_init"] == "default":  # absent unless used: manifests as before
            del data["lora_init"]
        return data

    def lora_scaling(self, rank: int) -> float:
        """The factor of a LoRA layer of ``rank``'s update B @ A (what PEFT computes from this plan)."""
        return self.lora_alpha / (rank ** 0.5 if self.rslora else self.rank)

    @classmethod
    def from_dict(cls, data: dict) -> PlanConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


# The options that choose which layers adapt and at what rank: given any of them, a task kind's
# default budget gives way to the plan they describe (petah.api.default_plan)
LAYOUT_OPTIONS = frozenset({"preset", "rank", "stage_ranks", "task_norm", "targets", "override_modules", "budget"})


@dataclass(frozen=True)
class Target:
    module: str
    method: str  # LORA or CHANNEL_SCALE
    rank: int  # 0 for CHANNEL_SCALE


PRESET_ROLES = {
    "petah": ("attn", "mlp", "conv"),
    "attn-lora": ("attn",),
}


def plain_name(key: str) -> str | None:
    """A tensor's name in the plain backbone (adapter wrappers removed); None for adapter tensors."""
    if ".lora_" in key or ".deltas." in key:
        return None
    return key.replace(".base_layer.", ".")
