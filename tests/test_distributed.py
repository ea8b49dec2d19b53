"""torchrun on CPU (gloo, 2 processes, tiny model): equivalence, single writer, disagreement, kill + resume."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import write_pattern_folder
from petah.backbones.tensors import to_torch
from petah.packages.format import read_package

ENV = {**os.environ, "PETAH_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "PETAH_DEVICE": "cpu"}
# the uniform plan (--rank 8): a budget's short probe warms its head on each rank's shard, so its
# allocation (and the training after it) is close to, not the same as, one process's
ADAPT = ["--val-split", "0.25", "--epochs", "3", "--batch-size", "4", "--checkpoint-every", "1", "--rank", "8",
         "--json"]


def torchrun(nproc, *args, **popen):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "petah", *map(str, args)]
    if popen:
        return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def setup_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    folder = write_pattern_folder(root / "shapes", 16)  # 36 train / 12 val: 9 global batches of 4 per epoch
    backbone = root / "bb.safetensors"
    proc = subprocess.run([sys.executable, "-m", "petah", "prepare", "efficientformerv2_s0", folder, "-o", backbone,
                           "--img-size", "64", "--val-split", "0.25", "--max-steps", "2", "--batch-size", "8"],
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    runs = {}
    for n in (1, 2):
        out = root / f"run{n}"
        proc = torchrun(n, "adapt", folder, "-b", backbone, "-o", out / "task.petah",
                        "--checkpoint-dir", out / "ckpt", *ADAPT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[n] = (out, proc)
    return {"root": root, "folder": folder, "backbone": backbone, "runs": runs}


def _tensors(path):
    return {k: to_torch(v) for k, v in read_package(path).tensors.items()}


def test_one_and_two_processes_train_the_same_model(setup_dir):
    (out1, proc1), (out2, proc2) = setup_dir["runs"][1], setup_dir["runs"][2]
    report1, report2 = json.loads(proc1.stdout), json.loads(proc2.stdout)
    assert report2["metrics"]["samples"] == report1["metrics"]["samples"] == 12  # no padding duplicates
    assert report2["accuracy"] == pytest.approx(report1["accuracy"], abs=1 / 12)
    a, b = _tensors(out1 / "task.petah"), _tensors(out2 / "task.petah")
    for key in a:
        torch.testing.assert_close(b[key].float(), a[key].float(), atol=2e-3, rtol=1e-2)


def test_exactly_one_writer(setup_dir):
    out2, proc2 = setup_dir["runs"][2]
    assert sorted(p.name for p in out2.iterdir()) == ["ckpt", "task.petah"]
    assert sorted(p.name for p in (out2 / "ckpt").iterdir()) == ["last.ckpt"]
    assert len([line for line in proc2.stdout.splitlines() if line.strip()]) == 1


def test_ranks_that_disagree_get_a_clear_error(setup_dir, tmp_path):
    script = tmp_path / "disagree.py"
    script.write_text(
        "import os\n"
        "from petah import api\nfrom petah.backbones import create_backbone\nfrom petah.data import load_dataset\n"
        "from petah.train import TrainConfig\nfrom petah.errors import PetahError\n"
        f"train, val = load_dataset({str(setup_dir['folder'])!r}, val_split=0.25)\n"
        f"backbone = create_backbone(weights={str(setup_dir['backbone'])!r})\n"
        "try:\n"
        "    api.adapt(backbone, train, val, config=TrainConfig(lr=1e-3 * (1 + int(os.environ['RANK'])), max_steps=1, "
        "batch_size=4))\n"
        "except PetahError as exc:\n    print('ERROR', exc)\n"
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    disagree = "ranks disagree on the configuration: rank(s) [1] differ from rank 0"
    assert proc.stdout.count(disagree) == 2  # both ranks, proc.stdout + proc.stderr[-2000:]


def test_killed_run_resumes_to_the_same_package(setup_dir):
    root, folder, backbone = setup_dir["root"], setup_dir["folder"], setup_dir["backbone"]
    out = root / "killed"
    ckpt = out / "ckpt" / "last.ckpt"
    args = ("adapt", folder, "-b", backbone, "-o", out / "task.petah", "--checkpoint-dir", out / "ckpt", *ADAPT)
    proc = torchrun(2, *args, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists() and torch.load(ckpt, weights_only=True)["global_step"] >= 4:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole torchrun group, mid-run
    proc.wait()
    killed_at = torch.load(ckpt, weights_only=True)["global_step"]
    assert 4 <= killed_at < 27 and not (out / "task.petah").exists()

    resumed = torchrun(2, *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference = _tensors(setup_dir["runs"][2][0] / "task.petah")
    result = _tensors(out / "task.petah")
    for key, value in reference.items():
        torch.testing.assert_close(result[key].float(), value.float(), atol=2e-3, rtol=1e-2)
