import copy

import numpy as np
import pytest
import torch

from petah import api
from petah.backbones import create_backbone
from petah.data import load_dataset
from petah.demo import demo_backbone_path
from petah.errors import PetahError
from petah.plans import PlanConfig
from petah.train import TrainConfig, Trainer


@pytest.fixture
def backbone():
    torch.manual_seed(0)
    return create_backbone("efficientformerv2_s0", 32)


def _adapt(backbone, folder, **config):
    train, val = load_dataset(str(folder), val_split=0.25)
    torch.manual_seed(0)
    return api.adapt(backbone, train, val, plan=PlanConfig(), config=TrainConfig(batch_size=8, **config),
                     adapter_dtype="float32")


def test_runs_are_deterministic(backbone, image_folder):
    a = _adapt(backbone, image_folder, epochs=1)
    b = _adapt(backbone, image_folder, epochs=1)
    assert all(np.array_equal(a.package.tensors[k], b.package.tensors[k]) for k in a.package.tensors)


def test_kill_and_resume_matches_uninterrupted_run(backbone, image_folder, tmp_path, monkeypatch):
    full = _adapt(backbone, image_folder, epochs=2)  # 27 images / 8 -> 4 steps per epoch, 8 in all

    calls = {"n": 0}
    real_step = torch.optim.AdamW.step

    def dies_at_step_6(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt  # a kill mid-epoch, after the step-5 checkpoint
        return real_step(self, *args, **kwargs)

    ckpt = tmp_path / "ckpt"
    monkeypatch.setattr(torch.optim.AdamW, "step", dies_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        _adapt(backbone, image_folder, epochs=2, checkpoint_dir=str(ckpt), checkpoint_every=1)
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    state = torch.load(ckpt / "last.ckpt", weights_only=True)
    assert (state["global_step"], state["epoch"], state["step_in_epoch"]) == (5, 1, 1)

    resumed = _adapt(backbone, image_folder, epochs=2, checkpoint_dir=str(ckpt), resume=True)
    assert resumed.train.steps == 8
    for key, value in full.package.tensors.items():
        np.testing.assert_allclose(np.asarray(resumed.package.tensors[key], np.float32), np.asarray(value, np.float32),
                                   rtol=1e-5, atol=1e-6)


def test_nan_loss_stops_with_message_and_keeps_checkpoint(backbone, image_folder, tmp_path, monkeypatch):
    from petah.tasks import Classification

    calls = {"n": 0}
    real_loss = Classification.loss

    def loss_that_explodes(smoothing=0.0, dice=False, **context):
        inner = real_loss(smoothing, dice, **context)

        def fn(logits, targets):
            calls["n"] += 1
            value = inner(logits, targets)
            return value * float("nan") if calls["n"] >= 3 else value

        return fn

    monkeypatch.setattr(Classification, "loss", staticmethod(loss_that_explodes))
    ckpt = tmp_path / "ckpt"
    with pytest.raises(PetahError, match=r"loss became nan at epoch 1, step 3; last good checkpoint"):
        _adapt(backbone, image_folder, epochs=1, checkpoint_dir=str(ckpt), checkpoint_every=1)
    assert torch.load(ckpt / "last.ckpt", weights_only=True)["global_step"] == 2


def test_warmup_cosine_schedule():
    from petah.train.trainer import warmup_cosine

    f = warmup_cosine(100, 0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5, abs=0.02) and f(99) < 0.01


def test_end_to_end_adapt_beats_chance_on_real_digits():
    backbone = create_backbone(weights=str(demo_backbone_path()))
    train, val = load_dataset("builtin:digits")
    train = train.subset(range(0, len(train), 2))  # 719 images keep the test short
    torch.manual_seed(0)
    result = api.adapt(backbone, train, val, plan=PlanConfig(), config=TrainConfig(epochs=2, lr=2e-3, head_lr=1e-2))
    assert result.metrics["accuracy"] > 0.6  # chance is 0.1
    assert len(result.metrics["confusion_matrix"]) == 10 and result.metrics["samples"] == len(val)
    assert Trainer  # the trainer is what ran


def test_resume_with_other_settings_is_refused(backbone, image_folder, tmp_path):
    ckpt = tmp_path / "ckpt"
    _adapt(backbone, image_folder, epochs=1, checkpoint_dir=str(ckpt))
    with pytest.raises(PetahError, match=r"other settings \(epochs\)"):
        _adapt(backbone, image_folder, epochs=3, checkpoint_dir=str(ckpt), resume=True)


def test_the_linear_probe_is_fitted_on_features_and_ships_as_a_plain_linear_head():
    """``--plan linear-probe`` of a classification task: the head fitted on the frozen backbone's
    features (strength chosen on a held-out fifth), far above chance, and the package scores what
    the fit scored (the standardisation is folded into the linear head)."""
    backbone = create_backbone(weights=str(demo_backbone_path()))
    train, val = load_dataset("builtin:digits")
    train, val = train.subset(range(0, len(train), 4)), val.subset(range(0, len(val), 2))
    result = api.adapt(backbone, train, val, plan=PlanConfig(preset="linear-probe"), config=TrainConfig(seed=1),
                       adapter_dtype="float32")
    probe = result.package.manifest.training["probe"]
    assert probe["solver"] == "lbfgs" and len(probe["holdout_accuracy"]) == 5 and probe["iterations"] > 0
    assert max(probe["holdout_accuracy"].values()) == probe["holdout_accuracy"][str(probe["strength"])]
    assert result.metrics["accuracy"] > 0.85  # chance is 0.1
    assert api.evaluate(backbone, result.package, val)["accuracy"] == pytest.approx(result.metrics["accuracy"])


def test_a_probe_never_predicts_a_class_without_training_images():
    from torch.utils.data import DataLoader, TensorDataset

    from petah.train.probe import fit_linear_probe

    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 3], 20)  # class 2 has no image
    features = rng.normal(size=(60, 8)) + 3 * np.eye(8)[labels]
    head = torch.nn.Linear(8, 4)
    loader = DataLoader(TensorDataset(torch.tensor(features, dtype=torch.float32), torch.tensor(labels)),
                        batch_size=16)
    result, report = fit_linear_probe(torch.nn.Identity(), head, loader, 4, seed=0)
    predicted = head(torch.tensor(features, dtype=torch.float32)).argmax(1).numpy()
    assert (predicted == labels).mean() > 0.95 and 2 not in predicted and result.last_loss < 0.5
    assert report["strength"] in (0.01, 0.1, 1.0, 10.0, 100.0)


def test_lora_plus_trains_the_b_matrices_at_its_multiple_of_the_rate(backbone, image_folder):
    from dataclasses import replace

    from petah.adapters import TaskAdapter
    from petah.tasks import Classification

    train, _ = load_dataset(str(image_folder), val_split=0.25)
    work = replace(backbone, model=copy.deepcopy(backbone.model))
    adapter = TaskAdapter(work, PlanConfig())
    head = Classification.head_for(work, len(train.classes))
    config = TrainConfig(lr=1e-3, head_lr=1e-2, lora_plus=16, batch_size=8, progress=False)
    trainer = Trainer(Classification.build_model(work.model, head), adapter.trainable_parameters(),
                      list(head.parameters()), Classification.loss(), Classification.view(
                          train, api.preprocess_for(backbone)), config, fast_params=adapter.lora_b_parameters())
    rates = [(group["initial_lr"], {id(p) for p in group["params"]}) for group in trainer.optimizer.param_groups]
    b = {id(p) for p in adapter.lora_b_parameters()}
    assert b and [rate for rate, _ in rates] == [1e-3, 1.6e-2, 1e-2] and rates[1][1] == b
    assert not rates[0][1] & b and rates[0][1] | b == {id(p) for p in adapter.trainable_parameters()}
    trained = _adapt(backbone, image_folder, epochs=1)  # end to end, at the task kind's default ratio
    assert trained.train.steps > 0 and trained.package.manifest.training["lora_plus"] == Classification.lora_plus == 16
    with pytest.raises(PetahError, match="lora-plus"):
        TrainConfig(lora_plus=0)
