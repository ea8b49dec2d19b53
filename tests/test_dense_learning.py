"""A short run of each dense task learns far above an untrained head (toy folders a user could make)."""

import pytest
import torch

from conftest import untrained_and_trained
from petah.backbones import create_backbone
from petah.data import load_dataset
from petah.train import TrainConfig
from test_detection import _write_coco
from test_segmentation import _write_mask_folder

CASES = {
    # kind: (folder writer, input size, metric, floor, margin over untrained, training)
    "segmentation": (_write_mask_folder, 32, "mIoU", 0.7, 0.25,
                     TrainConfig(epochs=12, batch_size=6, lr=3e-3, head_lr=1e-2)),
    "detection": (_write_coco, 64, "mAP50", 0.5, 0.4, TrainConfig(epochs=40, batch_size=6, lr=2e-3, head_lr=1e-2)),
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_a_short_run_learns_far_above_an_untrained_head(kind, tmp_path):
    write, size, metric, floor, margin, config = CASES[kind]
    torch.manual_seed(0)
    backbone = create_backbone("efficientformerv2_s0", size)
    train, val = load_dataset(str(write(tmp_path / kind, count=24)), val_split=0.25)
    untrained, trained = untrained_and_trained(backbone, train, val, config)
    assert trained[metric] > floor and trained[metric] > untrained[metric] + margin, (
        untrained[metric], trained[metric])
