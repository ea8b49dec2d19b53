"""Options defined once: the configs validate themselves (API and CLI get the same one-line error,
before any training or writing), and the CLI's options are the configs' fields."""

import math
import os

import pytest
import typer

from conftest import petah_process as petah
from conftest import write_pattern_folder
from petah import api
from petah.errors import PetahError
from petah.plans import MAX_RANK, PlanConfig
from petah.prune import PruneConfig
from petah.train import TrainConfig


# --- the configs refuse bad values (the API path) -------------------------------------------
@pytest.mark.parametrize("settings, fragment", [
    ({"epochs": 0}, "--epochs must be at least 1"),
    ({"batch_size": 0}, "--batch-size must be at least 1"),
    ({"lr": 0.0}, "--lr must be a positive number"),
    ({"lr": math.nan}, "--lr must be a positive number"),
    ({"lr": math.inf}, "--lr must be a positive number"),
    ({"head_lr": -1e-3}, "--head-lr must be a positive number"),
    ({"max_steps": 0}, "--max-steps must be at least 1"),
    ({"label_smoothing": 1.0}, "--label-smoothing must be in [0, 1)"),
    ({"label_smoothing": -0.1}, "--label-smoothing must be in [0, 1)"),
    ({"resume": True}, "--resume needs --checkpoint-dir"),
    ({"num_workers": -1}, "--workers must be >= 0"),
])
def test_train_config_refuses_bad_values(settings, fragment):
    with pytest.raises(PetahError) as caught:
        TrainConfig(**settings)
    assert str(caught.value).startswith(fragment) and "\n" not in str(caught.value)


@pytest.mark.parametrize("settings, fragment", [
    ({"rank": MAX_RANK + 1}, f"rank must be at most {MAX_RANK}"),
    ({"rank": 0}, "rank must be >= 1"),
    ({"dropout": -0.1}, "dropout must be in [0, 1)"),
    ({"dropout": 1.0}, "dropout must be in [0, 1)"),
    ({"alpha": 0.0}, "alpha must be a positive number"),
    ({"stage_ranks": {1: MAX_RANK + 1}}, "--stage-rank 1="),
    ({"stage_ranks": ["1:4"]}, "--stage-rank wants STAGE=RANK"),
])
def test_plan_config_refuses_bad_values(settings, fragment):
    with pytest.raises(PetahError) as caught:
        PlanConfig(**settings)
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


def test_prune_config_refuses_bad_values():
    with pytest.raises(PetahError, match="--batch-size must be at least 1"):
        PruneConfig(batch_size=0)
    with pytest.raises(PetahError, match="--recover-lr must be a positive number"):
        PruneConfig(recover_lr=0.0)


def test_good_configs_pass_and_keep_their_values():
    assert TrainConfig(resume=True, checkpoint_dir="ckpt", max_steps=1, label_smoothing=0.0).resume
    assert PlanConfig(stage_ranks=["0=0", "3=16"]).stage_ranks == {0: 0, 3: 16}
    assert PlanConfig(rank=MAX_RANK, dropout=0.5).rank == MAX_RANK


# --- the CLI's options are the config fields ------------------------------------------------
def _options(*path):
    import click

    from petah.cli import app

    command = typer.main.get_command(app)
    for name in path:  # build verbs are loaded on demand (petah.cli.LazyGroup)
        command = command.get_command(click.Context(command), name)
    return {opt: param for param in command.params for opt in param.opts}


@pytest.mark.parametrize("path, cls, only, exclude, defaults", [
    (("adapt",), TrainConfig, None, (), {}),
    (("adapt",), PlanConfig, None, (), {}),
    (("prepare",), TrainConfig, None, ("head_lr", "lora_plus", "lp_ft"), {"epochs": 5, "batch_size": 128}),
    (("prune",), PruneConfig, None, (), {}),
    (("plan", "show"), PlanConfig, None, ("dropout",), {}),
    (("bench", "prune"), PruneConfig, ("recover_epochs",), (), {"recover_epochs": 3}),
])
def test_cli_options_are_the_config_fields(path, cls, only, exclude, defaults):
    """Every CLI field of the config is an option of the command with the field's help and default
    (or the command's documented override), and the fields left out are absent."""
    from dataclasses import MISSING, fields

    options = _options(*path)
    for f in fields(cls):
        flag = f.metadata.get("cli")
        if flag is None:
            continue
        if f.name in exclude or (only is not None and f.name not in only):
            assert flag not in options or path == ("bench", "prune"), f"{flag} should not be on {path}"
            continue
        option = options[flag]
        assert option.help == f.metadata["help"], flag
        default = f.default if f.default is not MISSING else None
        assert option.default == defaults.get(f.name, default), flag


def test_cli_built_config_equals_the_api_config(monkeypatch):
    """What the CLI parses reaches the API as the same config object an API user would build."""
    from typer.testing import CliRunner

    from petah.cli import app
    from petah.cli import show as inspect_cli

    seen = {}
    monkeypatch.setattr(api, "plan_summary", lambda backbone, plan, classes, targets: seen.update(plan=plan) or {})
    monkeypatch.setattr(inspect_cli, "backbone", lambda *args: None)
    result = CliRunner().invoke(app, ["plan", "show", "resnet10t", "--rank", "4", "--stage-rank", "0=0",
                                      "--target", "fc", "--json"])
    assert result.exit_code == 0, result.output
    assert seen["plan"] == PlanConfig(rank=4, stage_ranks={0: 0}, targets=["fc"])


# --- plan resolution: stages and ranks checked against the backbone ---------------------------
@pytest.fixture(scope="module")
def small_backbone():
    return api.resolve_backbone("efficientformerv2_s0", img_size=32)


def test_stage_rank_for_a_stage_the_backbone_lacks_is_refused(small_backbone):
    with pytest.raises(PetahError, match="has no stage 9 .its stages: 0, 1, 2, 3"):
        api.plan_summary(small_backbone, plan=PlanConfig(stage_ranks={9: 4}))


def test_rank_above_a_layers_smaller_side_is_capped(small_backbone):
    from petah.adapters.targets import min_dimension

    summary = api.plan_summary(small_backbone, plan=PlanConfig(rank=MAX_RANK))
    lora = [layer for layer in summary["layers"] if layer["method"] == "lora"]
    capped = 0
    for layer in lora:
        side = min_dimension(small_backbone.model.get_submodule(layer["module"]))
        assert layer["rank"] == min(MAX_RANK, side)
        capped += side < MAX_RANK
    assert capped > 0  # the stem's 3x3 conv (27 inputs) at least


def test_resolve_backbone_refuses_a_missing_file(tmp_path):
    with pytest.raises(PetahError, match="backbone file not found"):
        api.resolve_backbone(tmp_path / "absent.safetensors")


# --- the CLI refuses before any work, as a real process -------------------------------------
@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_pattern_folder(tmp_path_factory.mktemp("opts") / "shapes", 4)


def _refused(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize("args, fragment", [
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--resume"], "--resume needs --checkpoint-dir"),
    (["--adapter-dtype", "float8"], "adapter_dtype must be one of"),
    (["--stage-rank", "9=4"], "has no stage 9"),
    (["--rank", "100000"], f"rank must be at most {MAX_RANK}"),
    (["--dropout", "1"], "dropout must be in [0, 1)"),
])
def test_adapt_refuses_bad_options_before_training(shapes, tmp_path, args, fragment):
    out = tmp_path / "x.petah"
    _refused(petah("adapt", shapes, "-b", "efficientformerv2_s0", "--img-size", "32", "--val-split", "0.25",
                   "-o", out, *args, ok=False), fragment)
    assert not out.exists() and not list(tmp_path.iterdir())


# --- output paths: checked before any work --------------------------------------------------
def _bad_outputs(tmp_path, suffix):
    afile = tmp_path / "afile"
    afile.write_text("x")
    folder = tmp_path / f"folder{suffix}"
    folder.mkdir()
    return [(afile / f"out{suffix}", "is a file, not a folder"), (folder, "it is a folder")]


@pytest.mark.parametrize("verb", ["adapt", "prepare", "prune"])
def test_outputs_that_cannot_be_written_are_refused_first(shapes, tmp_path, verb):
    suffix = ".petah" if verb == "adapt" else ".safetensors"
    for output, fragment in _bad_outputs(tmp_path, suffix):
        if verb == "adapt":
            args = ["adapt", shapes, "-b", "efficientformerv2_s0", "--img-size", "32", "--val-split", "0.25"]
        elif verb == "prepare":
            args = ["prepare", "efficientformerv2_s0", shapes, "--img-size", "32", "--val-split", "0.25"]
        else:
            args = ["prune", "-b", "efficientformerv2_s0", "--img-size", "32", "--importance", "magnitude"]
        before = sorted(p.name for p in tmp_path.rglob("*"))
        _refused(petah(*args, "-o", output, ok=False), f"cannot write {output}", fragment)
        assert sorted(p.name for p in tmp_path.rglob("*")) == before


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into a read-only folder anyway")
def test_output_in_a_read_only_folder_is_refused(tmp_path):
    from petah.files import check_writable

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(PetahError, match="no permission to write"):
            check_writable(locked / "sub" / "x.petah")
    finally:
        locked.chmod(0o755)


def test_write_check_creates_a_real_file_and_leaves_nothing(tmp_path):
    from petah.files import check_writable

    check_writable(tmp_path / "new" / "x.petah")
    assert list(tmp_path.iterdir()) == []  # the probe file is gone, no folder was made


def test_atomic_writes_sync_the_file_then_the_folder_that_holds_its_new_name(tmp_path, monkeypatch):
    """A rename is durable only once its folder is synced: every atomic write (packages, state,
    metadata) syncs the temp file's bytes, renames, then syncs the folder."""
    import stat

    from petah.files import atomic_write_bytes, staged_folder

    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)), real(fd))[1])
    atomic_write_bytes(tmp_path / "a" / "state.json", b"{}")
    assert synced == [False, True] and (tmp_path / "a" / "state.json").read_bytes() == b"{}"
    synced.clear()
    with staged_folder(tmp_path / "out") as stage:
        (stage / "x").write_bytes(b"1")
    assert synced == [True] and (tmp_path / "out" / "x").is_file()


# --- what the data decides and where the output goes: refused before any training --------------
def _renamed_class(root, name: bytes):
    """The pattern folder with its 'square' class folder renamed (bytes: any name Linux allows)."""
    data = write_pattern_folder(root / "data", 2)
    os.rename(os.fsencode(data / "square"), os.fsencode(data) + b"/" + name)
    return data


@pytest.mark.parametrize("class_name, output, fragments", [
    (b"x" * 231, "x.petah", ["class folder 'xxxxxxxxxx", "…' in ", "label is 231 characters",
                              "a package label holds at most 200"]),
    (b"sq\xffuare", "x.petah", ["class folder 'sq\\udcffuare' in ", "not valid UTF-8"]),
    (b"square", "/proc/x.petah", ["cannot write /proc/x.petah: cannot create a file in /proc"]),
    (b"square", "/proc/new/x.petah", ["cannot write /proc/new/x.petah: cannot create a file in /proc"]),
], ids=["label-too-long", "label-not-utf8", "output-in-proc", "output-under-proc"])
def test_adapt_refuses_what_would_fail_after_training(small_backbone, tmp_path, monkeypatch, class_name, output,
                                                      fragments):
    """A label the package cannot hold, or an output folder no file can be created in (/proc: root
    passes os.access there), is refused by name before the Trainer is even built."""
    from petah.data import load_dataset

    train, val = load_dataset(str(_renamed_class(tmp_path, class_name)), val_split=0.5)
    monkeypatch.setattr(api, "Trainer", lambda *args, **kwargs: pytest.fail("training started"))
    output = tmp_path / output  # an absolute output stays as it is
    with pytest.raises(PetahError) as refused:
        api.adapt(small_backbone, train, val, output=output, config=TrainConfig(max_steps=1))
    for fragment in fragments:
        assert fragment in str(refused.value)
    assert not output.exists()


def test_api_checks_outputs_before_training(small_backbone, shapes, tmp_path):
    from petah.data import load_dataset

    train, val = load_dataset(str(shapes), val_split=0.25)
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    with pytest.raises(PetahError, match="is a file, not a folder"):
        api.adapt(small_backbone, train, val, output=blocker / "x.petah", config=TrainConfig(max_steps=1))
    with pytest.raises(PetahError, match="adapter_dtype must be one of"):
        api.adapt(small_backbone, train, val, adapter_dtype="float8")
    with pytest.raises(PetahError, match="it is a folder"):
        api.prepare("efficientformerv2_s0", train, val, tmp_path, img_size=32)
    with pytest.raises(PetahError, match="is a file, not a folder"):
        api.prune_backbone(small_backbone, output=blocker / "p.safetensors")
    with pytest.raises(PetahError, match="task segmentation"):
        api.adapt(small_backbone, train, val, task="segmentation")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_keyword_only_options():
    with pytest.raises(TypeError):
        api.adapt(None, None, None, PlanConfig())  # options by name only: a positional one is a mistake


# --- defaults a task kind takes where the user set none ----------------------------------------
@pytest.mark.parametrize("kind, images, given, epochs, head_lr", [
    ("detection", 384, set(), 50, 1e-2),  # builtin:digit-boxes at batch 64: 6 steps an epoch
    ("detection", 576, set(), 34, 1e-2),  # 9 steps an epoch: 306 steps
    ("detection", 20000, set(), 10, 1e-2),  # a large set: the usual 10 epochs are steps enough
    ("detection", 384, {"epochs"}, 10, 1e-2),  # --epochs given (here 10): kept
    ("detection", 384, {"head_lr"}, 50, None),  # --head-lr given (here unset in the config): kept
    ("classification", 384, set(), 10, None),
    ("segmentation", 384, set(), 10, None),
])
def test_default_training_per_kind(kind, images, given, epochs, head_lr):
    from petah.tasks import TASK_KINDS

    config = api.default_training(TASK_KINDS[kind], images, TrainConfig(lr=3e-3), given)
    assert (config.epochs, config.head_lr, config.lr) == (epochs, head_lr, 3e-3)
