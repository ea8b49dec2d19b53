"""`petah bench methods`: accuracy vs stored bytes vs speed across backbones and adaptation methods.

Every run is a separate process (forked from a server that has done the imports), so its peak
RSS is its own. All methods see the same split: the built-in set's training part is split once
(seed 0) into train / val, and its own val part is the test set. A method's learning rate is
chosen on val with seed 0; the other seeds reuse it; test accuracy is reported.

No pretrained weights download here, so every backbone but the demo's is first trained by the
bench itself on a built-in source set (:class:`Source`), from random initialisation, in its own
process; the file is cached and reused by later runs.

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
from dataclasses import dataclass, replace
from pathlib import Path

SPLIT_SEED = 0
VAL_FRACTION = 0.2


@dataclass(frozen=True)
class Method:
    name: str
    plan: dict | None  # a petah PlanConfig as a dict; None for peft-by-hand
    rates: tuple[tuple[float, float], ...]  # (lr, head_lr) candidates, chosen on val
    train: tuple[tuple[str, object], ...] = ()  # training options beside the rates (a TrainConfig's fields)


_ADAPTER_RATES = ((1e-3, 1e-2), (3e-3, 1e-2))
METHODS = {m.name: m for m in [
    # fitted, not trained (petah.train.probe): the rates are not used, so one candidate
    Method("linear-probe", {"preset": "linear-probe"}, ((1e-2, 1e-2),)),
    Method("bitfit", {"preset": "bitfit"}, ((3e-3, 1e-2), (1e-2, 1e-2))),
    Method("attn-lora", {"preset": "attn-lora", "rank": 8}, _ADAPTER_RATES),
    Method("peft-by-hand", None, _ADAPTER_RATES),
    *[Method(f"petah-r{r}", {"preset": "petah", "rank": r}, _ADAPTER_RATES) for r in (2, 4, 8, 16)],
    # plain LoRA (no LoRA+, which petah-r8 has by default on classification); same plan, same bytes
    Method("petah-r8-plain", {"preset": "petah", "rank": 8}, _ADAPTER_RATES, (("lora_plus", 1.0),)),
    Method("petah-r8-rslora", {"preset": "petah", "rank": 8, "rslora": True}, _ADAPTER_RATES),  # alpha / sqrt(r)
    Method("petah-r8-dora", {"preset": "petah", "rank": 8, "dora": True}, _ADAPTER_RATES),  # + a magnitude per row
    # EVA: A starts at the top directions of each layer's inputs (petah.train.eva)
    Method("petah-r8-eva", {"preset": "petah", "rank": 8, "lora_init": "eva"}, _ADAPTER_RATES),
    # LP-FT: the head starts as the fitted probe
    Method("petah-r8-lp-ft", {"preset": "petah", "rank": 8}, _ADAPTER_RATES, (("lp_ft", True),)),
    # the task also owns its BatchNorm statistics (and ships them): for targets far from the source
    Method("petah-r8-stats", {"preset": "petah", "rank": 8, "task_norm": "stats"}, _ADAPTER_RATES),
    Method("full", {"preset": "full"}, ((3e-4, 1e-2), (1e-3, 1e-2))),
]}
TASKS = ("digits", "textures", "faces")
# The budget grid (petah adapt --budget): every method at the same stored bytes. A budget point
# is given in % of the backbone; the uniform petah plan takes the rank whose package is nearest to
# it, and that package's bytes are the budget of the others (so all sit within a few % of it).
# adalora is PEFT's AdaLoRA on the same LoRA layers, its target_r searched to those bytes.
BUDGET_METHODS = ("uniform", "budget-gradient", "budget-int8", "budget-activation", "adalora", "attn-lora")
BUDGET_RATES = (3e-3, 1e-2)  # the rate every petah plan chose on val in the method grid (methods-2026-11-29.json)
DEFAULT_BUDGETS = (1.0, 2.0, 3.0)
# Dense tasks: their heads alone are 1.8-2.4 % of the backbone, so larger budgets, and the demo's
# own recipe (10 epochs, batch 32). AdaLoRA is left out there: its PEFT model is timm's classifier.
DENSE_BUDGETS, DENSE_TASKS = (4.0, 6.0, 8.0), ("defects",)
FULL_REFERENCE_RATES = (1e-3, 1e-2)  # what full fine-tuning chose on val on most tasks there
REFERENCE_METHODS = ("linear-probe", "attn-lora", "petah-r4", "full")
SHOTS_METHODS = ("linear-probe", "petah-r8", "full")
# LoRA targets a user writes for EfficientFormerV2 by hand: attention, MLP, stem and downsample convs
PEFT_BY_HAND_TARGETS = (r".*(token_mixer\.(q|k|v|proj)(\.proj)?|mlp\.fc[12]|stem\.conv[12]|"
                        r"downsample\.(conv|attn\.(q\.proj|k|v|proj)))\.conv")


@dataclass(frozen=True)
class Source:
    """A source backbone the bench trains itself: from random initialisation on a built-in set."""

    model: str
    img_size: int | None = 64  # None: the family's fixed size
    data: str = "fashion-mnist"
    images: int = 20000  # the first N training images of `data`
    epochs: int = 1
    batch_size: int = 64
    lr: float = 2e-3
    max_steps: int | None = None

    def file_name(self) -> str:
        """Names the whole recipe (a short hash of it), so a cached file is reused only for the same one."""
        import hashlib

        recipe = hashlib.sha256(json.dumps(self.__dict__, sort_keys=True).encode()).hexdigest()[:10]
        return f"{self.model}-{self.img_size or 'fixed'}-{self.data}-{self.images}x{self.epochs}-{recipe}.safetensors"


# --- one run (inside its own process) ------------------------------------------------------
class _TrainingMemory:
    """Peak RSS while training, and its rise over the RSS at the start (Linux: VmHWM reset)."""

    @staticmethod
    def _status(field: str) -> int:
        import re

        return 1024 * int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))

    def __enter__(self):
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        self.start = self._status("VmRSS")
        return self

    def __exit__(self, *exc):
        self.peak = self._status("VmHWM")
        self.rise = self.peak - self.start


def _prepare_source(spec: dict) -> dict:
    """Train a source backbone (run as its own process, like the grid's runs)."""
    import torch

    from petah import api
    from petah.data import load_builtin
    from petah.train import TrainConfig

    source = Source(**spec["prepare"])
    torch.manual_seed(0)
    train, val = load_builtin(source.data)
    train = train.subset(list(range(min(source.images, len(train)))), f"{train.source} (first {source.images})")
    val = val.subset(list(range(min(2000, len(val)))), f"{val.source} (first 2000)")
    config = TrainConfig(epochs=source.epochs, batch_size=source.batch_size, lr=source.lr, seed=0,
                         max_steps=source.max_steps, progress=False)
    start = time.perf_counter()
    backbone, metrics = api.prepare(source.model, train, val, spec["out"], img_size=source.img_size, config=config,
                                    command="petah bench methods (source)")
    return {"path": spec["out"], "source": spec["prepare"], "seconds": round(time.perf_counter() - start, 1),
            "source_accuracy": round(metrics["accuracy"], 4), "backbone": backbone.describe()}


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


def _timm_classifier(backbone, classes: int):
    """timm's classifier model holding the shared backbone's weights (the classifier stays fresh),
    and the names of its classifier modules (what PEFT's ``modules_to_save`` must hold)."""
    import timm

    kwargs = {"img_size": backbone.img_size} if backbone.family and backbone.family.img_size_kwarg else {}
    model = timm.create_model(backbone.name, num_classes=classes, **kwargs)
    model.load_state_dict(backbone.model.state_dict(), strict=False)
    classifier = model.pretrained_cfg.get("classifier")
    return model, [classifier] if isinstance(classifier, str) else list(classifier)


def _adalora(backbone, train, config, equal_bytes: int, tries: int = 3):
    """PEFT's AdaLoRA on the petah plan's LoRA layers, its ``target_r`` searched so that its
    folder, with tensors in fp16 as petah stores adapters, takes ``equal_bytes`` (within 5 %, or
    the nearest of ``tries`` trainings: ``target_r`` is a whole average rank, so one step of it
    moves the bytes by about a rank on every layer). Norms stay frozen as in petah; ``update_and_allocate``
    runs after every step. As shipped: the saved folder reloaded onto the backbone."""
    import math
    import warnings

    import peft
    from safetensors.torch import load_file, save

    from petah.adapters.model import lora_config
    from petah.adapters.targets import resolve_targets
    from petah.api import preprocess_for
    from petah.data import Augment
    from petah.plans import PlanConfig
    from petah.tasks import Classification
    from petah.train import Trainer
    from petah.train.trainer import frozen_norms, schedule_steps

    targets = resolve_targets(backbone.model, backbone.family, PlanConfig(), backbone.name)
    pattern = lora_config(targets, PlanConfig()).target_modules  # the same layers, matched exactly
    view = Classification.view(train, preprocess_for(backbone), Augment(), config.seed)
    steps = schedule_steps(config, len(view))
    lora_layers = sum(t.method == "lora" for t in targets)
    target_r, best = 2, None
    for _ in range(tries):
        model, classifiers = _timm_classifier(backbone, len(train.classes))
        adalora = peft.AdaLoraConfig(target_r=target_r, init_r=math.ceil(1.5 * target_r), total_step=steps,
                                     tinit=steps // 10, tfinal=steps // 5, deltaT=1, target_modules=pattern,
                                     modules_to_save=classifiers)
        model = peft.get_peft_model(model, adalora)
        params = [p for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" not in n]
        head = [p for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" in n]
        result = Trainer(model, params, head, Classification.loss(config.label_smoothing), view, config,
                         set_train_mode=frozen_norms(model),  # frozen norms, as petah trains
                         after_step=model.base_model.update_and_allocate).fit()
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            # layers AdaLoRA pruned to rank 0 save as empty tensors, which PEFT warns of as a sharding mistake
            warnings.filterwarnings("ignore", message=".*invalid shape.*")
            model.save_pretrained(tmp)
            weights = load_file(str(Path(tmp) / "adapter_model.safetensors"))
            half = {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}
            stored = len(save(half)) + (Path(tmp) / "adapter_config.json").stat().st_size
            shipped = peft.PeftModel.from_pretrained(_timm_classifier(backbone, len(train.classes))[0], tmp)
        attempt = (abs(stored - equal_bytes), shipped, result, sum(p.numel() for p in params + head), stored, target_r)
        best = attempt if best is None or attempt[0] < best[0] else best
        if attempt[0] <= 0.05 * equal_bytes:
            break
        head_bytes = sum(v.numel() * 2 for k, v in half.items() if "modules_to_save" in k)
        per_rank = max(stored - head_bytes, 1) / max(target_r * lora_layers, 1)
        target_r = max(1, round((equal_bytes - head_bytes) / (per_rank * lora_layers)))
        if target_r == best[5]:
            break
    _, shipped, result, trainable, stored, target_r = best
    return shipped, result, trainable, stored, target_r


def _peft_by_hand(backbone, train, config):
    """The baseline: PEFT wired onto timm's classifier model by hand, trained by the same loop."""
    import peft

    from petah.data import Augment
    from petah.tasks import Classification
    from petah.train import Trainer

    def on_backbone():
        return _timm_classifier(backbone, len(train.classes))[0]

    model, classifiers = _timm_classifier(backbone, len(train.classes))
    lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules=PEFT_BY_HAND_TARGETS, modules_to_save=classifiers)
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
        shipped = peft.PeftModel.from_pretrained(on_backbone(), tmp)
    return shipped, result, sum(p.numel() for p in params + head), stored, model


def _latency_ms(model, img_size: int, repeats: int = 20) -> float:
    import torch

    from petah.export.timing import interleaved_medians

    x = torch.randn(1, 3, img_size, img_size)
    model.eval()
    with torch.no_grad():
        return 1e3 * interleaved_medians({"m": lambda: model(x)}, repeats)["m"]


def _nearest_rank(sizes, goal: float, ranks: range) -> int:
    """The rank whose package size (``sizes(rank)``, growing with the rank) is nearest ``goal``."""
    low, high = ranks.start, ranks.stop - 1
    while low < high:  # the smallest rank whose package reaches the goal
        mid = (low + high) // 2
        low, high = (mid + 1, high) if sizes(mid) < goal else (low, mid)
    return min({max(ranks.start, low - 1), low}, key=lambda r: abs(sizes(r) - goal))


def budget_plans(backbone, train, val, percent: float) -> tuple[dict[str, dict], int]:
    """The plans of one budget point at equal bytes, and those bytes."""
    import functools

    from petah import api
    from petah.plans import PlanConfig

    def sizes(preset: str):  # each size builds a package: the search asks some ranks twice
        return functools.cache(lambda rank: api.planned_bytes(backbone, PlanConfig(preset=preset, rank=rank), train,
                                                              val))

    petah_sizes = sizes("petah")
    rank = _nearest_rank(petah_sizes, backbone.weights_bytes * percent / 100, range(1, 33))
    equal = petah_sizes(rank)
    return {
        "uniform": {"preset": "petah", "rank": rank},
        "budget-gradient": {"preset": "petah", "budget": str(equal)},
        "budget-activation": {"preset": "petah", "budget": str(equal), "allocation": "activation"},
        # gradient allocation with LoRA factors stored in int8: about twice the rank for the bytes
        "budget-int8": {"preset": "petah", "budget": str(equal), "adapter_dtype": "int8"},
        "attn-lora": {"preset": "attn-lora", "rank": _nearest_rank(sizes("attn-lora"), equal, range(1, 65))},
    }, equal


def run_one(spec: dict) -> dict:
    """Train one method on one task with one seed and learning rate; measure it. With
    ``budget_percent`` the method is one of ``BUDGET_METHODS`` at that budget point."""
    import torch

    from petah import api
    from petah.backbones import create_backbone
    from petah.plans import PlanConfig
    from petah.tasks import Classification, kind_for_data
    from petah.train import TrainConfig

    torch.manual_seed(spec["seed"])
    backbone = create_backbone(weights=spec["backbone"])
    train, val, test = _splits(spec["task"], spec.get("shots"), spec.get("max_train"))
    lr, head_lr = spec["rates"]
    training = dict(METHODS[spec["method"]].train) if spec["method"] in METHODS else {}
    config = TrainConfig(epochs=spec["epochs"], batch_size=spec["batch_size"], lr=lr, head_lr=head_lr,
                         seed=spec["seed"], max_steps=spec.get("max_steps"), progress=False, **training)
    budget = {}
    if "budget_percent" in spec:
        plans, equal = budget_plans(backbone, train, val, spec["budget_percent"])
        method = Method(spec["method"], plans.get(spec["method"]), ())
        budget = {"equal_bytes": equal, "plan": method.plan}
    else:
        method = METHODS[spec["method"]]
    unshipped = None
    if spec["method"] == "adalora":
        with _TrainingMemory() as memory:
            model, result, trainable, stored, target_r = _adalora(backbone, train, config, budget["equal_bytes"])
        budget["plan"] = {"adalora_target_r": target_r}
    elif method.plan is None:
        with _TrainingMemory() as memory:
            model, result, trainable, stored, unshipped = _peft_by_hand(backbone, train, config)
    else:
        plan = dict(method.plan)
        adapter_dtype = plan.pop("adapter_dtype", "float16")  # how the package stores adapters (budget-int8)
        with _TrainingMemory() as memory:
            adapted = api.adapt(backbone, train, val, plan=PlanConfig(**plan), config=config,
                                task_name=spec["task"], adapter_dtype=adapter_dtype)
        with tempfile.TemporaryDirectory() as tmp:
            stored = api.save_package(adapted, Path(tmp) / "t.petah").stat().st_size
        model = api.load_task(backbone, adapted.package).model
        result, trainable = adapted.train, adapted.package.manifest.trainable_parameters
        allocation = adapted.package.manifest.training.get("allocation")
        if allocation:
            budget["allocation_seconds"] = allocation["seconds"]
    preprocess = api.preprocess_for(backbone)
    kind = kind_for_data(train)  # the primary metric: accuracy, or mIoU for the dense budget grid
    scores = {name: kind.evaluate(model, api.eval_loader(data, preprocess, kind), data.classes)[kind.primary_metric]
              for name, data in (("val", val), ("test", test))}
    if unshipped is not None:  # the in-process model, with BatchNorm statistics its folder lacks
        in_process = Classification.evaluate(unshipped, api.eval_loader(test, preprocess), test.classes)
        scores["test_in_process"] = in_process["accuracy"]
    return {
        **spec, **scores, **budget, "backbone_label": f"{backbone.name}@{backbone.img_size}px",
        "train_seconds": round(result.seconds, 2),
        "trainable_params": int(trainable),
        "stored_bytes": int(stored), "backbone_bytes": backbone.weights_bytes, "train_images": len(train),
        "images_per_second": round(result.images_per_second, 1), "step_seconds": result.seconds / max(result.steps, 1),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "train_peak_rss_bytes": memory.peak, "train_rss_rise_bytes": memory.rise,
        "latency_ms": round(_latency_ms(model, backbone.img_size), 3),
    }


# --- the suites ----------------------------------------------------------------------------
# The reference backbones and the sources the bench trains for them. The default mode's sources
# are small (one epoch of 20,000 Fashion-MNIST images, 91-229 s each here), so that the whole
# default run fits 60 minutes on 2 CPU cores (measured; see docs/benchmarks.md).
REFERENCES: dict[str, Source] = {
    "mobilevitv2_050": Source("mobilevitv2_050"),
    "fastvit_sa12": Source("fastvit_sa12"),
    "vit_tiny_patch16_224": Source("vit_tiny_patch16_224", epochs=2, lr=5e-4),  # from scratch at 2e-3 it stayed at 20 %
    "mobilenetv2_100": Source("mobilenetv2_100"),
    # EfficientFormer-V1 runs at 224 px only (~40x the MACs of V2 at 64 px): a source of 1,000
    # images took 186 s and each run 80-90 s on 200 images, at chance. Not in the default mode.
    "efficientformer_l1": Source("efficientformer_l1", None),
}
DEFAULT_REFERENCES = ("mobilevitv2_050", "fastvit_sa12", "vit_tiny_patch16_224", "mobilenetv2_100")
# --full: the sources get the demo backbone's recipe (all 60,000 images, 5 epochs)
FULL_SOURCE = {"images": 60000, "epochs": 5, "batch_size": 128}


# The reference backbone that also runs the budget grid in the default mode, at one point (time).
BUDGET_REFERENCE, BUDGET_REFERENCE_POINTS = "mobilevitv2_050", (2.0,)


def suite(mode: str, main_backbone: str, references: str = "default", seeds: int = 3,
          budgets_only: bool = False) -> list[Grid]:
    """The grids of `petah bench methods` in mode quick, default or full. ``budgets_only``: the
    budget grids alone (with one seed of full fine-tuning as their reference)."""
    from petah.errors import PetahError

    default = tuple(REFERENCES) if mode == "full" else DEFAULT_REFERENCES  # --full: the whole grid
    chosen = {"default": default, "all": tuple(REFERENCES), "none": ()}.get(references)
    names = list(chosen) if chosen is not None else [n.strip() for n in references.split(",") if n.strip()]
    unknown = [n for n in names if n not in REFERENCES]
    if unknown:
        raise PetahError(f"unknown reference backbone {unknown[0]!r}; choose from {', '.join(REFERENCES)}, "
                         "'default', 'all' or 'none'")
    if seeds < 1:
        raise PetahError("--seeds must be at least 1")
    if mode == "quick":  # CI smoke: the structure, not the numbers
        # the budget point's three ways of spending bytes (its int8 and activation rows are the
        # gradient row's code with one option more, tested in test_budget / test_adapter_forms)
        return [Grid(main_backbone, ("linear-probe", "attn-lora", "peft-by-hand", "petah-r8", "full"), ("digits",),
                     seeds=1, epochs=1, max_train=128, max_steps=3, choose_rate=False, budgets=(2.0,),
                     budget_methods=("uniform", "budget-gradient", "adalora")),
                Grid(None, REFERENCE_METHODS, ("digits",), seeds=1, epochs=1, max_train=64, max_steps=2,
                     choose_rate=False, source=Source("mobilenetv2_100", 32, data="mnist5k", images=256, max_steps=2))]
    main = Grid(main_backbone, tuple(METHODS), seeds=seeds, shots=(10, 50, 100, None), budgets=DEFAULT_BUDGETS,
                budgets_only=budgets_only)
    dense = Grid(main_backbone, (), DENSE_TASKS, seeds=1, epochs=10, batch_size=32, budgets=DENSE_BUDGETS,
                 budgets_only=True, label_suffix=" (dense)")
    if mode == "full":  # every method that is not tied to the main backbone's module names
        every = tuple(m for m in METHODS if m != "peft-by-hand")
        return [main, dense, *[Grid(None, every, seeds=seeds, shots=main.shots, budgets=DEFAULT_BUDGETS,
                                    source=replace(REFERENCES[n], **FULL_SOURCE), budgets_only=budgets_only)
                               for n in names]]
    grids = [Grid(None, REFERENCE_METHODS, seeds=1, source=REFERENCES[n], budgets_only=budgets_only,
                  budgets=BUDGET_REFERENCE_POINTS if n == BUDGET_REFERENCE else ()) for n in names]
    if budgets_only:
        grids = [g for g in grids if g.budgets]
    return [main, dense, *grids]


# --- the grid (the parent process) ---------------------------------------------------------
def _run(spec: dict) -> dict:
    return _prepare_source(spec) if "prepare" in spec else run_one(spec)


_PRELOAD = ("petah.api", "petah.data", "petah.backbones", "timm", "peft", "sklearn.datasets", "skimage.data")


def _serve() -> None:
    """The fork server: import once, then run each JSON spec from stdin in a forked child.

    A plain ``python -m`` per run spent about 6 of its ~15 s importing (measured); a forked child
    still has its own peak RSS and training-memory window. (multiprocessing's forkserver re-runs
    the caller's main module in every child, which the ``petah`` entry point does not survive.)
    """
    import importlib

    for module in _PRELOAD:  # imports only: no torch op may run here, or its thread pools would be forked
        importlib.import_module(module)
    for line in sys.stdin:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the run
            os.close(read)
            os.dup2(2, 1)  # stray prints must not reach the reply channel
            try:
                reply, code = {"result": _run(json.loads(line))}, 0
            except BaseException as exc:  # reported to the parent, which raises it as a PetahError
                lines = str(exc).strip().splitlines()
                reply, code = {"error": f"{type(exc).__name__}: {lines[-1] if lines else ''}"}, 1
            with os.fdopen(write, "w") as channel:
                channel.write(json.dumps(reply))
            os._exit(code)
        os.close(write)
        with os.fdopen(read) as channel:
            text = channel.read()
        _, status = os.waitpid(pid, 0)
        print(text or json.dumps({"error": f"the run's process died (wait status {status})"}), flush=True)


class Runner:
    """Runs specs in fresh processes through one fork server; a context manager that stops it."""

    def __enter__(self):
        env = {**os.environ, "PETAH_NO_PROGRESS": "1"}
        self.server = subprocess.Popen([sys.executable, "-m", "petah.bench.methods", "--serve"], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        return self

    def __exit__(self, *exc):
        self.server.stdin.close()
        self.server.wait()

    def __call__(self, spec: dict) -> dict:
        from petah.errors import PetahError

        self.server.stdin.write(json.dumps(spec) + "\n")
        self.server.stdin.flush()
        line = self.server.stdout.readline()
        reply = json.loads(line) if line else {"error": "the bench's fork server stopped"}
        if "error" in reply:
            what = "source " + spec["prepare"]["model"] if "prepare" in spec else f"{spec['method']} on {spec['task']}"
            raise PetahError(f"bench run {what} failed: {reply['error']}")
        return reply["result"]


@dataclass
class Grid:
    backbone: str | None  # a backbone file; None: the bench trains `source` first
    methods: tuple[str, ...]
    tasks: tuple[str, ...] = TASKS
    seeds: int = 3
    epochs: int = 3
    batch_size: int = 64
    max_train: int | None = 600
    max_steps: int | None = None
    shots: tuple[int | None, ...] = ()  # per class; None: every training image
    shots_task: str = "digits"
    choose_rate: bool = True  # False: each method's first candidate rate
    source: Source | None = None
    budgets: tuple[float, ...] = ()  # % of the backbone: the budget grid's points (budget_methods, 1 seed)
    budgets_only: bool = False  # skip the method grid (and its shots), run the budget grid alone
    budget_methods: tuple[str, ...] = BUDGET_METHODS
    label_suffix: str = ""  # tells apart two grids on one backbone (the dense budget grid)


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
        **{k: first[k] for k in ("equal_bytes", "plan") if k in first},
        **{k: round(statistics.fmean(r[k] for r in runs), 2) for k in ("train_seconds", "allocation_seconds")
           if k in first},
        **{k: round(statistics.fmean(r[k] for r in runs), 4)
           for k in ("images_per_second", "step_seconds", "peak_rss_bytes", "train_peak_rss_bytes",
                     "train_rss_rise_bytes", "latency_ms")},
    }


def _applicable(methods: tuple[str, ...], model: str) -> tuple[tuple[str, ...], list[str]]:
    """Drop attn-lora where the family has no attention (the plain-CNN references)."""
    from petah.plans import family_for

    family = family_for(model)
    skipped = [m for m in methods if m == "attn-lora" and family is not None and not family.has_attention]
    return tuple(m for m in methods if m not in skipped), skipped


def source_backbone(source: Source, folder: Path, run: Runner, log) -> dict:
    """The cached source backbone file for `source`, trained in its own process if missing."""
    path = folder / source.file_name()
    if path.is_file():
        from petah.backbones import read_backbone_metadata

        meta = read_backbone_metadata(path)
        log(f"source {path.name}: reusing the file trained earlier")
        return {"path": str(path), "source": source.__dict__, "reused": True,
                "seconds": meta.get("training", {}).get("seconds"),
                "source_accuracy": meta.get("metrics", {}).get("accuracy")}
    folder.mkdir(parents=True, exist_ok=True)
    prep = run({"prepare": source.__dict__, "out": str(path)})
    log(f"source {path.name}: trained in {prep['seconds']:.0f} s, source accuracy {prep['source_accuracy']:.4f}")
    return prep


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_grid(grid: Grid, run: Runner, sources: Path, log=_log) -> dict:
    """One backbone's methods x tasks x seeds (trains its source first where it has none)."""
    start = time.perf_counter()
    prep = source_backbone(grid.source, sources, run, log) if grid.backbone is None else None
    backbone = grid.backbone or prep["path"]
    methods, skipped = _applicable(grid.methods, grid.source.model if grid.source else _model_name(backbone))
    base = {"backbone": backbone, "epochs": grid.epochs, "batch_size": grid.batch_size,
            "max_train": grid.max_train, "max_steps": grid.max_steps}
    runs, table = [], {}
    for task in () if grid.budgets_only else grid.tasks:
        for name in methods:
            rates = [list(r) for r in (METHODS[name].rates if grid.choose_rate else METHODS[name].rates[:1])]
            trials = [run({**base, "task": task, "method": name, "seed": 0, "rates": r}) for r in rates]
            best = max(trials, key=lambda r: r["val"])
            seeds = [best] + [run({**base, "task": task, "method": name, "seed": s, "rates": best["rates"]})
                              for s in range(1, grid.seeds)]
            runs += trials + seeds[1:]
            table.setdefault(task, {})[name] = _summary(seeds)
            log(f"{best['backbone_label']} {task} {name}: test {table[task][name]['test_mean']:.4f} ± "
                f"{table[task][name]['test_std']:.4f} (lr {best['rates'][0]}) {time.perf_counter() - start:.0f} s")
    budgets = run_budget_grid(grid, run, base, runs, table, log, start)
    shots = {}
    for n in () if grid.budgets_only else grid.shots:
        for name in SHOTS_METHODS:
            if name not in methods:
                continue
            rates = table.get(grid.shots_task, {}).get(name, {}).get("rates") or list(METHODS[name].rates[0])
            few = run({**base, "task": grid.shots_task, "method": name, "seed": 0, "rates": rates,
                       "shots": n, "max_train": None})
            shots.setdefault(str(n or "all"), {})[name] = few["test"]
            log(f"{grid.shots_task} {n or 'all'} shots {name}: {few['test']:.4f}")
    grid_fields = {k: v for k, v in grid.__dict__.items() if k != "source"}
    return {"label": runs[0]["backbone_label"] + grid.label_suffix, "grid": grid_fields,
            "source": prep, "skipped": skipped, "table": table, "shots": shots, "budgets": budgets, "runs": runs,
            "seconds": round(time.perf_counter() - start, 1), "targets": {**targets(table),
                                                                          **budget_targets(budgets, table)}}


def run_budget_grid(grid: Grid, run: Runner, base: dict, runs: list, methods_table: dict, log, start: float) -> dict:
    """task -> budget % -> method -> summary: the methods of one budget point at equal bytes. Where
    the method grid did not run full fine-tuning (``budgets_only``), one seed of it is the reference."""
    model = grid.source.model if grid.source else _model_name(base["backbone"])
    every, _ = _applicable(grid.budget_methods, model)
    table: dict = {}
    for task in grid.tasks if grid.budgets else ():
        methods = [m for m in every if not (m == "adalora" and task in DENSE_TASKS)]
        if "full" not in methods_table.get(task, {}):
            full = run({**base, "task": task, "method": "full", "seed": 0, "rates": list(FULL_REFERENCE_RATES)})
            runs.append(full)
            methods_table.setdefault(task, {})["full"] = _summary([full])
        for percent in grid.budgets:
            for name in methods:
                one = run({**base, "task": task, "method": name, "seed": 0, "rates": list(BUDGET_RATES),
                           "budget_percent": percent})
                runs.append(one)
                row = table.setdefault(task, {}).setdefault(str(percent), {})
                row[name] = _summary([one])
                log(f"{one['backbone_label']} {task} budget {percent} % ({one['equal_bytes']:,} B) {name}: "
                    f"test {one['test']:.4f} at {one['stored_bytes']:,} B {time.perf_counter() - start:.0f} s")
    return table


def budget_targets(budgets: dict, table: dict) -> dict:
    """The budget issue's claims on the measured grid: the budget plan vs uniform rank at equal
    bytes, vs full fine-tuning at <= 3 % of its bytes, and what the allocation adds to training time."""
    if not budgets:
        return {}
    margins, near_full, overhead = [], [], []
    for task, points in budgets.items():
        for percent, rows in points.items():
            if "budget-gradient" in rows and "uniform" in rows:
                mine, uniform = rows["budget-gradient"], rows["uniform"]
                margins.append({"task": task, "budget_percent": float(percent),
                                "margin_points": round(100 * (mine["test_mean"] - uniform["test_mean"]), 2),
                                "bytes_vs_uniform": _ratio(mine["stored_bytes"], uniform["stored_bytes"])})
                overhead.append(mine.get("allocation_seconds", 0.0) / max(uniform["train_seconds"], 1e-9))
        full = table.get(task, {}).get("full")
        fitting = [r["budget-gradient"] for r in points.values() if "budget-gradient" in r]
        fitting = [r for r in fitting if full and r["stored_bytes"] <= 0.03 * full["stored_bytes"]]
        if fitting:
            best = max(fitting, key=lambda r: r["test_mean"])
            gap = round(100 * (full["test_mean"] - best["test_mean"]), 2)
            near_full.append({"task": task, "stored_bytes": best["stored_bytes"], "gap_points": gap,
                              "within_1_point": gap <= 1.0})
    mean = round(statistics.fmean(m["margin_points"] for m in margins), 2) if margins else None
    return {"budget_vs_uniform": margins, "budget_vs_uniform_mean_points": mean,
            "budget_within_1pt_of_full_at_3pct_bytes": near_full,
            "allocation_time_vs_training": round(max(overhead), 3) if overhead else None}


def _model_name(backbone_file: str) -> str:
    from petah.backbones import read_backbone_metadata

    return read_backbone_metadata(backbone_file)["name"]


def run_suite(grids: list[Grid], sources: Path, log=_log) -> dict:
    """The backbones one after another, through one fork server."""
    start = time.perf_counter()
    results = {}
    with Runner() as run:
        for grid in grids:
            result = run_grid(grid, run, sources, log)
            results[result["label"]] = result
    return {"backbones": results, "seconds": round(time.perf_counter() - start, 1)}


def _ratio(a: float, b: float) -> float:
    return round(a / b, 3)


def targets(table: dict) -> dict:
    """The issue's three claims, checked on the measured table (None where a method is missing)."""
    out: dict = {}
    near_full = []
    for task, rows in table.items():
        if "full" not in rows:
            continue
        full = rows["full"]
        cands = [(n, r) for n, r in rows.items()
                 if n.startswith("petah") and r["stored_bytes"] <= 0.03 * full["stored_bytes"]]
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
        petah = [(n, r) for n, r in rows.items() if n.startswith("petah")]
        cands = [(n, r) for n, r in petah if r["stored_bytes"] <= attn["stored_bytes"]]
        if not cands and petah:  # no petah plan that small here: report the smallest one and its size
            cands = [min(petah, key=lambda nr: nr[1]["stored_bytes"])]
        if cands:
            name, best = max(cands, key=lambda nr: nr[1]["test_mean"])
            beats.append({"task": task, "method": name,
                          "margin_points": round(100 * (best["test_mean"] - attn["test_mean"]), 2),
                          "bytes_vs_attn_lora": _ratio(best["stored_bytes"], attn["stored_bytes"])})
    out["petah_vs_attn_lora_at_equal_or_fewer_bytes"] = beats
    speed = []
    adapter = next((n for n in ("petah-r8", "petah-r4") if any(n in rows for rows in table.values())), None)
    for task, rows in table.items():
        if "full" in rows and adapter in rows:
            mine, full = rows[adapter], rows["full"]
            row = {"task": task, "method": adapter, "step_vs_full": _ratio(mine["step_seconds"], full["step_seconds"]),
                   "peak_rss_vs_full": _ratio(mine["peak_rss_bytes"], full["peak_rss_bytes"]),
                   "training_rss_rise_vs_full": _ratio(mine["train_rss_rise_bytes"], full["train_rss_rise_bytes"])}
            if "peft-by-hand" in rows:
                hand = rows["peft-by-hand"]
                row["step_vs_peft_by_hand"] = _ratio(mine["step_seconds"], hand["step_seconds"])
                row["peft_by_hand_step_vs_full"] = _ratio(hand["step_seconds"], full["step_seconds"])
                row["peft_by_hand_rss_rise_vs_full"] = _ratio(hand["train_rss_rise_bytes"],
                                                              full["train_rss_rise_bytes"])
            speed.append(row)
    out["training_speed"] = speed
    return out


# --- report ------------------------------------------------------------------------------
def _table_markdown(result: dict) -> list[str]:
    lines = ["| task | method | test acc (mean ± std) | seeds | trainable params | stored bytes | % of backbone | "
             "train img/s | step ms | peak RSS MB | training RSS rise MB | latency ms |", "|" + "---|" * 12]
    for task, rows in result["table"].items():
        for name, r in rows.items():
            lines.append(
                f"| {task} | {name} | {r['test_mean']:.4f} ± {r['test_std']:.4f} | {r['seeds']} | "
                f"{r['trainable_params']:,} | {r['stored_bytes']:,} | "
                f"{100 * r['stored_bytes'] / r['backbone_bytes']:.2f} | {r['images_per_second']:.0f} | "
                f"{1e3 * r['step_seconds']:.0f} | {r['peak_rss_bytes'] / 2**20:.0f} | "
                f"{r['train_rss_rise_bytes'] / 2**20:.0f} | {r['latency_ms']:.2f} |")
    unshipped = [f"{task} {name}: {r['test_in_process_mean']:.4f}" for task, rows in result["table"].items()
                 for name, r in rows.items() if "test_in_process_mean" in r]
    if unshipped:
        lines += ["", "Test accuracy in the training process, with BatchNorm statistics the saved folder does not hold "
                  "(not what ships): " + "; ".join(unshipped) + "."]
    if result["skipped"]:
        lines += ["", f"Not run (no attention layers): {', '.join(result['skipped'])}."]
    if result["shots"]:
        methods = sorted({m for row in result["shots"].values() for m in row})
        lines += ["", f"Shots per class ({result['grid']['shots_task']}):", "",
                  "| shots per class | " + " | ".join(methods) + " |", "|" + "---|" * (len(methods) + 1)]
        for n, row in result["shots"].items():
            lines.append(f"| {n} | " + " | ".join(f"{row[m]:.4f}" if m in row else "-" for m in methods) + " |")
    return lines


def _source_line(result: dict) -> str:
    prep = result["source"]
    if prep is None:
        return "Source: the backbone file given (for the default, the demo's: trained by petah on Fashion-MNIST)."
    s = prep["source"]
    steps = f" (at most {s['max_steps']} steps)" if s["max_steps"] else ""
    return (f"Source: trained by the bench from random initialisation on the first {s['images']:,} images of "
            f"{s['data']}, {s['epochs']} epoch(s){steps}: source accuracy {prep['source_accuracy']:.4f}, "
            f"{prep['seconds'] or 0:.0f} s.")


def overview(suite: dict) -> list[str]:
    """Mean test accuracy over the tasks, one row per backbone, one column per method."""
    methods = list(dict.fromkeys(m for r in suite["backbones"].values() for rows in r["table"].values() for m in rows))
    lines = ["| backbone | " + " | ".join(methods) + " |", "|" + "---|" * (len(methods) + 1)]
    for label, result in suite["backbones"].items():
        cells = []
        for m in methods:
            rows = [rows[m] for rows in result["table"].values() if m in rows]
            share = 100 * statistics.fmean(r["stored_bytes"] / r["backbone_bytes"] for r in rows) if rows else 0.0
            cells.append(f"{statistics.fmean(r['test_mean'] for r in rows):.3f} ({share:.1f} %)" if rows else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _budget_markdown(result: dict) -> list[str]:
    """One row per task and budget point: each method's test accuracy and stored bytes."""
    budgets = result.get("budgets") or {}
    if not budgets:
        return []
    methods = list(dict.fromkeys(m for points in budgets.values() for rows in points.values() for m in rows))
    lines = ["", "At equal stored bytes (`petah adapt --budget`; 1 seed; test accuracy, mIoU for segmentation; "
                 "stored bytes in % of the backbone; uniform, attn-lora and AdaLoRA at the rank nearest the budget):",
             "",
             "| task | budget | " + " | ".join(methods) + " | full |", "|" + "---|" * (len(methods) + 3)]
    for task, points in budgets.items():
        full = result["table"].get(task, {}).get("full")
        for percent, rows in points.items():
            cells = []
            for m in methods:
                r = rows.get(m)
                plan = r.get("plan") or {} if r else {}
                rank = plan.get("rank") or plan.get("adalora_target_r")
                rank = f" r{rank}" if rank else ""
                cells.append(f"{r['test_mean']:.4f} ({100 * r['stored_bytes'] / r['backbone_bytes']:.2f} %{rank})"
                             if r else "-")
            lines.append(f"| {task} | {percent} % | " + " | ".join(cells) +
                         f" | {full['test_mean']:.4f} |" if full else " | - |")
    return lines


def markdown(suite: dict) -> str:
    lines = ["Mean test accuracy over the tasks (stored bytes as % of the backbone file):", "", *overview(suite)]
    for label, result in suite["backbones"].items():
        lines += ["", f"### {label}", "", _source_line(result), "", *_table_markdown(result), *_budget_markdown(result)]
    return "\n".join(lines) + "\n"


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both fewer bytes and higher accuracy, by bytes."""
    front, best = [], -1.0
    for x, y in sorted(points):
        if y > best:
            front.append((x, y))
            best = y
    return front


def plots(suite: dict, folder: Path) -> list[Path]:
    """Accuracy vs stored bytes (with each panel's Pareto front) and vs latency: a row per backbone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    results = list(suite["backbones"].values())
    tasks = list(dict.fromkeys(t for r in results for t in r["table"]))
    # one colour per method everywhere
    colours = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(METHODS)}
    for key, label, log_x in (("stored_bytes", "stored bytes per task (log)", True),
                              ("latency_ms", "latency, batch 1 (ms)", False)):
        fig, axes = plt.subplots(len(results), len(tasks), figsize=(4.2 * len(tasks), 3.4 * len(results)),
                                 squeeze=False)
        for axes_row, result in zip(axes, results, strict=True):
            for ax, task in zip(axes_row, tasks, strict=True):
                rows = result["table"].get(task, {})
                for name, r in rows.items():
                    ax.errorbar(r[key], r["test_mean"], yerr=r["test_std"],
                                fmt="o", capsize=2, label=name, color=colours.get(name))
                if key == "stored_bytes" and rows:
                    front = pareto([(r[key], r["test_mean"]) for r in rows.values()])
                    ax.plot(*zip(*front, strict=True), "k--", lw=0.8, label="Pareto front")
                if log_x:
                    ax.set_xscale("log")
                ax.set_title(f"{result['label']}: {task}", fontsize=9)
                ax.set_xlabel(label)
                ax.set_ylabel("test accuracy")
                ax.grid(alpha=0.3)
            axes_row[-1].legend(fontsize=6, loc="lower right")
        fig.suptitle(f"accuracy vs {label.split(' (')[0]}", fontsize=10)
        fig.tight_layout(rect=(0, 0, 1, 0.985))
        path = folder / f"methods-accuracy-vs-{key.split('_')[0]}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    with_budgets = [r for r in results if r.get("budgets")]
    if with_budgets:
        written.append(_budget_plot(with_budgets, folder, plt))
    return written


def _budget_plot(results: list[dict], folder: Path, plt) -> Path:
    """Test accuracy vs stored bytes per task, one line per budget-grid method, full as a dashed line."""
    tasks = list(dict.fromkeys(t for r in results for t in r["budgets"]))
    colours = {name: plt.get_cmap("tab10")(i) for i, name in enumerate(BUDGET_METHODS)}
    fig, axes = plt.subplots(len(results), len(tasks), figsize=(4.2 * len(tasks), 3.4 * len(results)), squeeze=False)
    for axes_row, result in zip(axes, results, strict=True):
        for ax, task in zip(axes_row, tasks, strict=True):
            points = result["budgets"].get(task, {})
            for name in BUDGET_METHODS:
                xy = sorted((100 * rows[name]["stored_bytes"] / rows[name]["backbone_bytes"], rows[name]["test_mean"])
                            for rows in points.values() if name in rows)
                if xy:
                    ax.plot(*zip(*xy, strict=True), "o-", label=name, color=colours[name])
            full = result["table"].get(task, {}).get("full")
            if full:
                ax.axhline(full["test_mean"], color="k", ls="--", lw=0.8, label="full fine-tuning")
            ax.set_title(f"{result['label']}: {task}", fontsize=9)
            ax.set_xlabel("stored bytes, % of the backbone")
            ax.set_ylabel("test mIoU" if task in DENSE_TASKS else "test accuracy")
            ax.grid(alpha=0.3)
        axes_row[-1].legend(fontsize=6, loc="lower right")
    fig.suptitle("accuracy at equal byte budgets", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    path = folder / "methods-budget.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        _serve()
    else:  # one run by hand, to reproduce a grid entry: JSON spec in, one JSON line out
        print(json.dumps(_run(json.loads(sys.argv[1]))))
