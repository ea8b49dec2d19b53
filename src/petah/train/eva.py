"""``--lora-init eva``: start each LoRA layer's A at the top principal directions of the inputs it
sees on the task's training data (EVA, Paischer et al. 2024), B at zero as usual, so the first
steps of B already act in the directions the layer's inputs actually vary in.

The directions come from ``petah.train.allocate.input_moments`` (the same probe as
``--allocation activation``): the top eigenvectors of X^T X, X's rows the vectors the layer's
weight multiplies (a conv's unfolded patches, reshaped back into A's kernel). PEFT's own EVA
(``initialize_lora_eva_weights``, 0.21) takes Linear layers only and language-model batches;
petah's targets are mostly convs. The backbone is not changed (unlike PiSSA / OLoRA, which move
the top directions out of the frozen weight): the shared backbone stays shared.
"""

from __future__ import annotations

import time

import torch

from petah.adapters import TaskAdapter
from petah.plans import LORA
from petah.train.allocate import input_moments


@torch.no_grad()
def eva_init(adapter: TaskAdapter, view, config, total_steps: int) -> float:
    """Set every LoRA layer's A of ``adapter`` to the top directions of its inputs, orthogonal rows of
    one length (B stays zero: the model's outputs do not change);
    a layer of higher rank than its input width keeps PEFT's initial rows beyond it. Returns the
    seconds it took (they count as training time)."""
    started = time.perf_counter()
    layers = {t.module: adapter.model.get_submodule(t.module) for t in adapter.targets if t.method == LORA}
    moments = input_moments(adapter.model, layers, view, config, total_steps, "--lora-init eva",
                            "--lora-init default")
    for name, layer in layers.items():
        weight = layer.lora_A[adapter.name].weight  # (rank, inputs) or a conv's (rank, in, kh, kw)
        moment = moments[name].double()
        values, vectors = torch.linalg.eigh(moment)  # ascending
        kept = min(weight.shape[0], len(values))
        top = vectors[:, -kept:].flip(1).T  # (kept, inputs): orthonormal rows, largest first
        # the rows' common length gives A's outputs the energy PEFT's random start gives them: unit
        # rows on the top directions carry far more (up to the input width times), and with LoRA+'s
        # rate on B the first steps diverged (the digits test: accuracy 0.11 at --lr 3e-3)
        start = weight[:kept].reshape(kept, -1).double()
        energy = ((start @ moment) * start).sum() / values[-kept:].clamp_min(0).sum().clamp_min(1e-30)
        weight[:kept] = (top * energy.sqrt()).reshape(kept, *weight.shape[1:]).to(weight.dtype)
    return time.perf_counter() - started
