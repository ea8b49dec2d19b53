"""Does ``petah adapt --plan linear-probe`` with its defaults reach a probe trained by hand on the
same features?

    python benchmarks/linear_probe.py [--tasks digits,textures,faces] [--seeds 0,1,2] [--label NAME] [--out FILE]

On the method bench's classification tasks and splits (``petah.bench.methods``: the built-in
train set split 80/20 into train / val with seed 0, the built-in test set) and its main backbone
(the bundled demo backbone), per task and seed:

* ``default``: ``api.adapt(..., plan=PlanConfig(preset="linear-probe"), config=TrainConfig(seed=s))``
  - petah's defaults, what a new user gets; scored on the test set;
* ``by_hand``: what a person does by hand: the frozen backbone's pooled training features and
  scikit-learn's ``LogisticRegression(max_iter=1000)`` with its defaults, scored on the test set.

Run it once on the code before a change (``PYTHONPATH=OLD_CHECKOUT/src``) and once after: the
``by_hand`` column is the same both times and checks that both ran on the same data.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np
import torch


def hand_probe(backbone, train, test) -> float:
    from sklearn.linear_model import LogisticRegression

    from petah import api

    def features(data):
        rows, labels = [], []
        with torch.no_grad():
            for images, targets in api.eval_loader(data, api.preprocess_for(backbone)):
                rows.append(backbone.model.eval()(images).numpy())
                labels.append(targets.numpy())
        return np.concatenate(rows), np.concatenate(labels)

    x, y = features(train)
    probe = LogisticRegression(max_iter=1000).fit(x, y)
    tx, ty = features(test)
    return float((probe.predict(tx) == ty).mean())


def main() -> None:
    import petah
    from petah import api
    from petah.backbones import create_backbone, demo_backbone_path
    from petah.bench.methods import _splits
    from petah.plans import PlanConfig
    from petah.train import TrainConfig

    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", default="digits,textures,faces")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--label", default="now")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    backbone = create_backbone(weights=str(demo_backbone_path()))
    rows = []
    for task in args.tasks.split(","):
        train, val, test = _splits(task, None, None)
        for seed in map(int, args.seeds.split(",")):
            torch.manual_seed(seed)
            started = time.perf_counter()
            adapted = api.adapt(backbone, train, val, plan=PlanConfig(preset="linear-probe"),
                                config=TrainConfig(seed=seed, progress=False), task_name=task)
            seconds = time.perf_counter() - started
            default = api.evaluate(backbone, adapted.package, test)["accuracy"]
            rows.append({"task": task, "seed": seed, "default": default, "by_hand": hand_probe(backbone, train, test),
                         "default_seconds": round(seconds, 2), "probe": adapted.package.manifest.training.get("probe")})
            print(json.dumps(rows[-1]), flush=True)
    summary = {}
    for task in dict.fromkeys(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == task]
        summary[task] = {key: {"mean": round(statistics.mean(r[key] for r in mine), 4),
                               "std": round(statistics.stdev(r[key] for r in mine), 4) if len(mine) > 1 else 0.0}
                         for key in ("default", "by_hand", "default_seconds")}
    result = {"label": args.label, "petah": petah.__file__, "cpu": platform.processor() or platform.machine(),
              "torch_threads": torch.get_num_threads(), "summary": summary, "rows": rows}
    print(json.dumps(summary, indent=1))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
