"""PyTorch's distributed engine, as petah uses it: torchrun env, DDP, samplers, reductions.

``torchrun --nproc-per-node N -m petah adapt …`` sets RANK / WORLD_SIZE / LOCAL_RANK; the first
training call then joins the process group (NCCL on GPU, gloo on CPU). Without those variables
everything runs as one process and nothing here changes behaviour.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from petah.errors import PetahError


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _device(local_rank: int) -> torch.device:
    if torch.cuda.is_available() and os.environ.get("PETAH_DEVICE", "auto") != "cpu":
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def setup() -> DistContext:
    """Join the process group torchrun describes (idempotent); return this process's place."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _device(local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
        # left to the interpreter's shutdown, the gloo group's threads were once torn down while
        # joinable: "terminate called without an active exception", exit -6, after a good run
        atexit.register(_leave_group)
    if dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device)
    return DistContext(0, 1, 0, device)


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def check_ranks_agree(what: str, value: object) -> None:
    """Every rank must hold the same ``value`` (config, data); else one clear error on all ranks."""
    if not dist.is_initialized():
        return
    digest = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]
    digests: list = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest)
    if len(set(digests)) > 1:
        differing = [r for r, d in enumerate(digests) if d != digests[0]]
        raise PetahError(f"ranks disagree on the {what}: rank(s) {differing} differ from rank 0")


class ResumableDistributedSampler(DistributedSampler):
    """torch's DistributedSampler (same shuffling, padding and sharding) that can start mid-epoch."""

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:  # type: ignore[override]
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self):
        return iter(list(super().__iter__())[self.start :])

    def __len__(self) -> int:
        return self.num_samples - self.start


def eval_indices(size: int, ctx: DistContext) -> list[int]:
    """This rank's share of an evaluation set: strided, no padding duplicates."""
    return list(range(ctx.rank, size, ctx.world_size))
