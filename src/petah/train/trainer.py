"""The one training loop shared by every task kind (and by ``petah prepare``).

Ready for torchrun: the sampler is chosen in ``make_sampler`` only, and only the main process
writes checkpoints or shows progress (``is_main_process``).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch.utils.data import DataLoader

from petah.data import TrainingView
from petah.errors import PetahError
from petah.files import atomic_write_bytes
from petah.options import flag, option, require_positive
from petah.train.distributed import DistContext, ResumableDistributedSampler, check_ranks_agree, is_main_process, setup

CHECKPOINT_NAME = "last.ckpt"
# A resumed run must continue the same schedule over the same data order.
RESUME_MUST_MATCH = ("epochs", "batch_size", "lr", "head_lr", "lora_plus", "lp_ft", "seed", "max_steps")
stderr = Console(stderr=True)


@dataclass
class TrainConfig:
    """How a task (or a backbone) is trained; its fields are the CLI's training options."""

    epochs: int = option(10, cli="--epochs", help=(
        "Training epochs. Default 10; petah adapt --task detection: enough for 300 steps over the data (10 to 50)."))
    batch_size: int = option(64, help="Images per step.", cli="--batch-size")
    lr: float = option(2e-3, help="Peak learning rate.", cli="--lr")  # adapters / backbone
    head_lr: float | None = option(None, cli="--head-lr", help=(
        "Peak learning rate of the head (default: --lr; petah adapt --task detection: 1e-2)."))
    # LoRA+ (Hayou et al. 2024): B learns faster than A; PEFT's create_loraplus_optimizer gives every
    # other parameter one rate, but petah's head has its own (--head-lr), so the groups are made here
    lora_plus: float | None = option(None, cli="--lora-plus", help=(
        "LoRA+: the learning rate of LoRA's B matrices as a multiple of --lr (1: plain LoRA). Default: the "
        "task kind's, 16 for classification and segmentation, 1 for detection (measured)."))
    # LP-FT (Kumar et al. 2022): the head starts as the fitted linear probe, so the adapters are not
    # first pulled around by a random head's gradients
    lp_ft: bool = option(False, help="LP-FT: fit the head as a linear probe on the frozen features first, "
                                     "then train adapters and head from it (classification).", cli="--lp-ft")
    weight_decay: float = option(0.01, help="AdamW weight decay.")
    warmup_fraction: float = option(0.05, help="Fraction of all steps of linear warm-up before the cosine decay.")
    label_smoothing: float = option(0.1, help="Label smoothing of the classification loss, in [0, 1).",
                                    cli="--label-smoothing")
    seed: int = option(0, help="Seed for data order, augmentation and init.", cli="--seed")
    checkpoint_dir: str | None = option(None, help="Write resumable checkpoints here.", cli="--checkpoint-dir")
    checkpoint_every: int = option(0, help="Also checkpoint every N steps.", cli="--checkpoint-every")
    resume: bool = option(False, help="Continue from the checkpoint in --checkpoint-dir.", cli="--resume")
    num_workers: int = option(0, help="Data loader worker processes.", cli="--workers")
    progress: bool = option(True, help="Show a progress bar.")
    max_steps: int | None = option(None, help="Stop after this many steps.", cli="--max-steps")

    def __post_init__(self) -> None:
        """Refuse a bad setting here, before any training: API and CLI users get the same one line."""
        def name(field_name: str) -> str:
            return flag(TrainConfig, field_name)

        for key in ("epochs", "batch_size"):
            if getattr(self, key) < 1:
                raise PetahError(f"{name(key)} must be at least 1, got {getattr(self, key)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise PetahError(f"{name('max_steps')} must be at least 1, got {self.max_steps}")
        for key in ("lr", "head_lr", "lora_plus"):
            require_positive(name(key), getattr(self, key))
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise PetahError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.warmup_fraction <= 1:
            raise PetahError(f"warmup_fraction must be in [0, 1], got {self.warmup_fraction}")
        if not 0 <= self.label_smoothing < 1:
            raise PetahError(f"{name('label_smoothing')} must be in [0, 1), got {self.label_smoothing}")
        for key in ("checkpoint_every", "num_workers"):
            if getattr(self, key) < 0:
                raise PetahError(f"{name(key)} must be >= 0, got {getattr(self, key)}")
        if self.resume and not self.checkpoint_dir:
            raise PetahError(f"{name('resume')} needs {name('checkpoint_dir')}: the folder to resume from")

    def to_dict(self) -> dict:
        return asdict(self)


def make_sampler(dataset: TrainingView, seed: int, ctx: DistContext) -> ResumableDistributedSampler:
    """The one place the training sampler is chosen: torch's DistributedSampler (1 rank or many)."""
    return ResumableDistributedSampler(dataset, ctx.world_size, ctx.rank, seed)


def schedule_steps(config: TrainConfig, samples: int, batch: int | None = None) -> int:
    """Optimizer steps of a run over ``samples`` images at ``batch`` images a step (default the
    global batch): ``epochs`` of ceil(samples / batch) steps, capped by ``max_steps``."""
    steps = math.ceil(samples / (batch or config.batch_size)) * config.epochs
    return steps if config.max_steps is None else min(steps, config.max_steps)


def frozen_norms(backbone: nn.Module, trains: dict[str, bool] | None = None) -> Callable[[nn.Module], None]:
    """A ``set_train_mode``: the model in train mode, but the backbone's BatchNorm layers in eval
    mode (the shared statistics must not drift), except those ``trains`` marks True (a task's own)."""
    trains = trains or {}

    def set_mode(model: nn.Module) -> None:
        model.train()
        for name, module in backbone.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and not trains.get(name, False):
                module.eval()
    return set_mode


def warmup_cosine(total_steps: int, warmup_fraction: float) -> Callable[[int], float]:
    warmup = max(1, int(total_steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


@dataclass
class TrainResult:
    steps: int
    epochs: int
    seconds: float
    images_per_second: float
    last_loss: float



def to_device(targets, device):
    """Class indices or masks (a tensor), or detection targets (a list of dicts of tensors)."""
    if isinstance(targets, torch.Tensor):
        return targets.to(device)
    return [{k: v.to(device) for k, v in t.items()} for t in targets]

class Trainer:
    """Trains ``model`` on ``data``; only ``params`` (and ``head_params``) are optimised.

    ``fast_params``: those of ``params`` that learn at ``--lora-plus`` times the rate (LoRA's B).
    ``set_train_mode(model)`` puts the model in its training mode: a frozen backbone keeps its
    BatchNorm layers in eval mode so the shared statistics never drift. ``after_step(step)`` runs
    after each optimizer step, while the step's gradients are still there (PEFT's AdaLoRA
    reallocates its ranks there).
    """

    def __init__(
        self,
        model: nn.Module,
        params: list[nn.Parameter],
        head_params: list[nn.Parameter],
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        data: TrainingView,
        config: TrainConfig,
        set_train_mode: Callable[[nn.Module], None] | None = None,
        sync_batchnorm: bool = False,
        unused_parameters: bool = False,
        after_step: Callable[[int], None] | None = None,
        fast_params: list[nn.Parameter] = (),
    ):
        self.ctx = setup()
        self.unused_parameters = unused_parameters
        self.loss_fn, self.data, self.config = loss_fn, data, config
        self.set_train_mode = set_train_mode or (lambda m: m.train())
        self.after_step = after_step
        if config.batch_size % self.ctx.world_size:
            raise PetahError(f"--batch-size {config.batch_size} (the global batch) must divide by the "
                             f"{self.ctx.world_size} processes")
        self.rank_batch = config.batch_size // self.ctx.world_size
        self.model = model.to(self.ctx.device)  # the plain module: checkpoints hold its keys
        self.forward_model = self._wrap(self.model, sync_batchnorm)
        ratio = config.lora_plus or 1.0  # unset outside a task's adapt (a backbone's training): plain
        fast = {id(p) for p in fast_params} if ratio != 1 else set()  # LoRA's B matrices (LoRA+)
        slow = [p for p in params if id(p) not in fast]
        groups = [{"params": slow, "lr": config.lr}] if slow else []
        if fast:
            groups.append({"params": [p for p in params if id(p) in fast], "lr": config.lr * ratio})
        groups.append({"params": head_params, "lr": config.head_lr or config.lr})
        self.optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
        self.sampler = make_sampler(data, config.seed, self.ctx)
        self.steps_per_epoch = math.ceil(self.sampler.num_samples / self.rank_batch)
        self.total_steps = schedule_steps(config, self.sampler.num_samples, self.rank_batch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(self.total_steps, config.warmup_fraction)
        )
        self.global_step = 0
        self.epoch = 0
        self.step_in_epoch = 0

    def _wrap(self, model: nn.Module, sync_batchnorm: bool) -> nn.Module:
        """DDP across ranks: it all-reduces gradients of trainable parameters only."""
        if not self.ctx.distributed:
            return model
        if sync_batchnorm and self.ctx.device.type == "cuda":
            # torch's SyncBatchNorm runs on GPUs only; on CPU each rank normalises its own batch.
            from timm.layers import convert_sync_batchnorm

            model = convert_sync_batchnorm(model)
            self.model = model
        device_ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
        # dense heads read intermediate stages: adapters after the last one get no gradient
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids,
                                                   find_unused_parameters=self.unused_parameters)

    def _all_finite(self, loss: torch.Tensor) -> bool:
        """Every rank stops together: one rank's NaN would otherwise leave the others waiting."""
        finite = torch.isfinite(loss.detach()).float().reshape(1)
        if self.ctx.distributed:
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        return bool(finite.item())

    def _autocast(self):
        """bf16 autocast on GPU; fp32 on CPU."""
        if self.ctx.device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # --- checkpoints -------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path | None:
        return Path(self.config.checkpoint_dir) / CHECKPOINT_NAME if self.config.checkpoint_dir else None

    def save_checkpoint(self) -> None:
        if self.checkpoint_path is None or not is_main_process():
            return
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "config": self.config.to_dict(),
        }
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(self.checkpoint_path, buffer.getvalue())

    def load_checkpoint(self) -> bool:
        path = self.checkpoint_path
        if path is None or not path.is_file():
            return False
        try:  # our own file, still read with weights_only: no arbitrary pickle
            state = torch.load(str(path), map_location=self.ctx.device, weights_only=True)
            saved = state.get("config", {})
            # a setting newer than the checkpoint was at its default there
            defaults = {k: f.default for k, f in TrainConfig.__dataclass_fields__.items()}
            defaults["lora_plus"] = 1.0  # a checkpoint from before --lora-plus trained plain LoRA
            changed = [k for k in RESUME_MUST_MATCH if saved.get(k, defaults[k]) != getattr(self.config, k)]
            if changed:
                raise PetahError(f"cannot resume from {path}: it was written with other settings "
                                 f"({', '.join(changed)})")
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (RuntimeError, KeyError, ValueError, EOFError) as exc:
            raise PetahError(f"cannot resume from {path}: {str(exc).splitlines()[0]}") from exc
        torch.set_rng_state(state["torch_rng"].cpu())
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        self.global_step = int(state["global_step"])
        if self.step_in_epoch >= self.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        return True

    # --- loop --------------------------------------------------------------------------
    def _loader(self) -> DataLoader:
        return DataLoader(
            self.data,
            batch_size=self.rank_batch,
            sampler=self.sampler,
            num_workers=self.config.num_workers,
            persistent_workers=False,
            collate_fn=getattr(self.data, "collate", None),  # detection: targets are lists of boxes
        )

    def fit(self) -> TrainResult:
        cfg = self.config
        if cfg.resume:
            resumed = self.load_checkpoint()
            # every rank must read the same checkpoint (on several nodes: a shared checkpoint dir)
            check_ranks_agree("resume point (is --checkpoint-dir shared by all nodes?)", [resumed, self.global_step])
            if resumed and is_main_process():
                stderr.print(f"resumed from {self.checkpoint_path} at epoch {self.epoch + 1}, step "
                             f"{self.step_in_epoch}")
        start, seen, loss_value, ips = time.perf_counter(), 0, float("nan"), 0.0
        show = cfg.progress and is_main_process() and not os.environ.get("PETAH_NO_PROGRESS")
        progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"),
            TextColumn("{task.fields[ips]:.0f} img/s"),
            TimeElapsedColumn(),
            console=stderr,
            disable=not show or not stderr.is_terminal,  # logs get one line per epoch instead
            transient=True,
        )
        with progress:
            bar = progress.add_task("train", total=self.total_steps, completed=self.global_step,
                                    epoch=self.epoch + 1, loss=float("nan"), ips=0.0)
            while self.epoch < cfg.epochs and self.global_step < self.total_steps:
                self.data.set_epoch(self.epoch)
                self.sampler.set_epoch(self.epoch, self.step_in_epoch * self.rank_batch)
                self.set_train_mode(self.model)
                for images, targets in self._loader():
                    images, targets = images.to(self.ctx.device, non_blocking=True), to_device(targets, self.ctx.device)
                    with self._autocast():
                        loss = self.loss_fn(self.forward_model(images), targets)
                    if not self._all_finite(loss):
                        where = f"epoch {self.epoch + 1}, step {self.step_in_epoch + 1}"
                        saved = self.checkpoint_path and self.checkpoint_path.is_file()
                        kept = f"; last good checkpoint: {self.checkpoint_path}" if saved else ""
                        raise PetahError(f"training stopped: loss became {loss.item()} at {where}{kept}")
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    self.optimizer.step()
                    self.scheduler.step()
                    if self.after_step is not None:
                        self.after_step(self.global_step)
                    self.global_step += 1
                    self.step_in_epoch += 1
                    seen += len(targets)
                    loss_value = loss.item()
                    ips = seen * self.ctx.world_size / max(1e-9, time.perf_counter() - start)
                    progress.update(bar, advance=1, epoch=self.epoch + 1, loss=loss_value, ips=ips)
                    if cfg.checkpoint_every and self.global_step % cfg.checkpoint_every == 0:
                        self.save_checkpoint()
                    if self.global_step >= self.total_steps:
                        break
                if self.step_in_epoch >= self.steps_per_epoch:  # the epoch is complete
                    self.epoch, self.step_in_epoch = self.epoch + 1, 0
                    if show and not stderr.is_terminal:  # logs get a line per epoch, not a bar
                        stderr.print(f"epoch {self.epoch}/{cfg.epochs} step {self.global_step} loss {loss_value:.4f} "
                                     f"{ips:.0f} img/s")
                self.save_checkpoint()
        self.model.eval()
        seconds = time.perf_counter() - start
        return TrainResult(self.global_step, self.epoch, seconds,
                           seen * self.ctx.world_size / max(seconds, 1e-9), loss_value)
