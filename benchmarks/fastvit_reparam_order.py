"""FastViT: adapt after reparameterizing (petah's order) or adapt the train-time branches, merge,
then reparameterize? Same adapter policy on both graphs (LoRA on every Linear / dense conv, a
channel scale on every depthwise conv), same data, seed and steps; one run, side by side.

    python benchmarks/fastvit_reparam_order.py [--epochs 2] [--img-size 64] [--out FILE.json]

The backbone is timm's random init (no hub weights offline): the comparison is of the two
orders, not of FastViT's accuracy. Reported: trainable parameters, training images/s, accuracy,
and for the branch order whether merge → reparameterize reproduces the adapted model.
"""

from __future__ import annotations

import argparse
import copy
import json
from dataclasses import replace

import timm
import torch
from timm.utils.model import reparameterize_model

from petah import api
from petah.backbones import create_backbone
from petah.backbones.factory import fingerprint
from petah.data import load_dataset
from petah.plans import PlanConfig
from petah.train import TrainConfig

EVERY_LAYER = PlanConfig(targets=[r".*"], rank=8)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="fastvit_sa12")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--data", default="builtin:digits")
    parser.add_argument("--out")
    args = parser.parse_args()

    torch.manual_seed(0)
    branches = timm.create_model(args.model, num_classes=0).eval().requires_grad_(False)
    reparam = reparameterize_model(copy.deepcopy(branches))  # the very same function, folded
    template = create_backbone(args.model, args.img_size)
    backbones = {
        "reparameterize, then adapt (petah)": replace(template, model=reparam, fingerprint=fingerprint(reparam)),
        "adapt branches, merge, then reparameterize": replace(template, model=branches,
                                                              fingerprint=fingerprint(branches)),
    }
    train, val = load_dataset(args.data, None, 0)
    rows = {}
    for label, backbone in backbones.items():
        result = api.adapt(backbone, train, val, plan=EVERY_LAYER, config=TrainConfig(epochs=args.epochs, seed=0),
                           task_name="digits", adapter_dtype="float32")
        task = api.load_task(backbone, result.package)
        rows[label] = {
            "adapted_layers": len(task.adapter.targets),
            "trainable_parameters": sum(p.numel() for p in task.adapter.trainable_parameters()),
            "train_images_per_second": round(result.train.images_per_second, 1),
            "accuracy": result.metrics["accuracy"],
        }
        if backbone.model is branches:
            rows[label]["merge_then_reparameterize_max_abs_error"] = _merge_then_reparameterize_error(backbone, task)
    report = {"model": args.model, "img_size": args.img_size, "epochs": args.epochs, "data": args.data,
              "threads": torch.get_num_threads(), "results": rows}
    print(json.dumps(report, indent=1))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(report, handle, indent=1)


@torch.no_grad()
def _merge_then_reparameterize_error(backbone, task) -> float:
    """Fold the adapters into the branch convs, reparameterize, compare with the adapted model."""
    x = torch.randn(4, 3, backbone.img_size, backbone.img_size)
    expected = task.model.backbone(x)
    task.adapter.merge()
    plain = timm.create_model(backbone.name, num_classes=0)
    plain.load_state_dict(task.adapter.backbone_weights())
    deployed = reparameterize_model(plain.eval())
    return float((deployed(x) - expected).abs().max())


if __name__ == "__main__":
    main()
