"""Crash points: an install, a rollback, a capture with its review, an audit log's appends and
rotations, a hub's init and its release-key rotation are each cut short at every file-system step
they take (``tests/crash_child.py`` dies there as ``kill -9`` would leave it), and what a restart
finds is checked: the old state or the new one, never a mix; nothing half-written kept; nothing
already there lost; no leftovers that grow.
(Process crashes: what a power cut can reorder below the file system is not simulated here.)"""

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from petah.files import AppendLog
from petah.packages import generate_keypair, read_manifest, sign_package
from petah.serve import ServeConfig, Station, demo_device_backbone, demo_packages
from petah.serve.capture import CaptureConfig, CaptureStore
from petah.serve.state import StateDir, sha256_bytes

CHILD = Path(__file__).with_name("crash_child.py")
CRASHED = 86
DIGITS = next(p for p in demo_packages() if p.stem == "digits")
pytestmark = pytest.mark.slow


def crash_runs(operation: str, template: Path, tmp: Path, *args, most: int = 60):
    """Yield (folder, completed) for LIMIT = 0, 1, …: a fresh copy of ``template`` the child ran
    ``operation`` in, cut short before step LIMIT + 1, until a run completes."""
    for limit in range(most):
        root = tmp / f"{operation}-{limit}"
        shutil.copytree(template, root, symlinks=True)
        done = subprocess.run([sys.executable, str(CHILD), operation, str(root), str(limit), *map(str, args)],
                              cwd=CHILD.parent.parent, capture_output=True, text=True, timeout=120)
        assert done.returncode in (0, CRASHED), done.stderr[-2000:]
        yield root, done.returncode == 0
        if done.returncode == 0:
            return
    raise AssertionError(f"{operation} did not complete within {most} steps")


def served(state: Path) -> dict:
    station = Station(demo_device_backbone(), state, ServeConfig(engine="device", threads=1))
    return {t["name"]: (t["version"], t["previous_version"]) for t in station.task_list()}


def only_its_own_files(state: Path) -> None:
    """After a restart the state dir holds station.json and the packages it names, nothing else."""
    entries = StateDir(state, demo_device_backbone().fingerprint).entries
    named = {s for e in entries.values() for s in (e.sha256, e.previous) if s}
    assert {p.name for p in (state / "packages").iterdir()} == {f"{s}.petah" for s in named}
    assert {p.name for p in state.iterdir()} <= {"station.json", "packages"}


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    """The demo's digits and the same signed by a packager (other bytes, same answers)."""
    tmp = tmp_path_factory.mktemp("versions")
    generate_keypair(tmp / "packager")
    again = tmp / "digits-signed.petah"
    shutil.copyfile(DIGITS, again)
    sign_package(again, tmp / "packager.key")
    return DIGITS, again


def test_an_install_cut_short_anywhere_restarts_with_the_old_version_or_the_new(tmp_path, versions):
    old, new = versions
    template = tmp_path / "template"
    Station(demo_device_backbone(), template / "state", ServeConfig(engine="device", threads=1), packages=[old])
    old_v, new_v = sha256_bytes(old.read_bytes())[:12], sha256_bytes(new.read_bytes())[:12]
    seen = []
    for root, completed in crash_runs("install", template, tmp_path, new):
        found = served(root / "state")["digits"]
        assert found in ((old_v, None), (new_v, old_v)), found
        assert found == (new_v, old_v) or not completed
        only_its_own_files(root / "state")
        seen.append(found[0])
    assert len(seen) >= 6 and seen[0] == old_v and seen[-1] == new_v  # the steps were counted: it was cut


def test_a_rollback_cut_short_anywhere_restarts_with_one_of_the_two(tmp_path, versions):
    old, new = versions
    template = tmp_path / "template"
    Station(demo_device_backbone(), template / "state", ServeConfig(engine="device", threads=1),
            packages=[old, new])
    old_v, new_v = sha256_bytes(old.read_bytes())[:12], sha256_bytes(new.read_bytes())[:12]
    steps = 0
    for root, _completed in crash_runs("rollback", template, tmp_path, "digits"):
        assert served(root / "state")["digits"] in ((new_v, old_v), (old_v, new_v))
        only_its_own_files(root / "state")
        steps += 1
    assert served(root / "state")["digits"] == (old_v, new_v) and steps >= 3


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (16, 16, 3), np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _on_disk(folder: Path) -> int:
    return sum(p.stat().st_size for p in (folder / "images").iterdir()) + (folder / "index.jsonl").stat().st_size


def test_a_capture_cut_short_anywhere_loses_nothing_and_leaves_nothing(tmp_path):
    manifest = read_manifest(DIGITS)
    labels = list(manifest.labels)
    template = tmp_path / "template"
    config = CaptureConfig(capture_dir=str(template / "capture"), capture="random", capture_random=1.0)
    store = CaptureStore(template / "capture", config)
    kept = [store.keep(f"{i}.png", _png(i), {"digits": {"label": labels[0], "confidence": 0.4}},
                       {"digits": manifest}, set()) for i in range(2)]
    store.review(kept[0], "digits", label=labels[2])
    (tmp_path / "new.png").write_bytes(_png(99))
    outcomes = set()
    for root, completed in crash_runs("capture", template, tmp_path, tmp_path / "new.png", DIGITS):
        folder = root / "capture"
        again = CaptureStore(folder, CaptureConfig(capture_dir=str(folder), capture="random", capture_random=1.0))
        assert set(kept) <= set(again.entries) and again.corrections[kept[0]]["digits"]["label"] == labels[2]
        new = set(again.entries) - set(kept)
        assert len(new) <= 1
        named = {again.entries[i]["file"] for i in again.entries}
        assert {p.name for p in (folder / "images").iterdir()} == named  # no orphan, no temp file
        assert again.used == _on_disk(folder)  # the limit counts what is there
        reviewed = bool(new) and "digits" in again.corrections.get(next(iter(new)), {})
        outcomes.add((len(new), reviewed))
        assert completed <= reviewed
        # the folder goes on working: the next capture is kept and read back
        extra = again.keep("after.png", _png(7), {"digits": {"label": labels[0], "confidence": 0.4}},
                           {"digits": manifest}, set())
        assert extra in CaptureStore(folder, CaptureConfig(capture_dir=str(folder))).entries
    assert outcomes == {(0, False), (1, False), (1, True)}


def test_a_torn_last_line_does_not_swallow_the_next_one(tmp_path):
    manifest = read_manifest(DIGITS)
    folder = tmp_path / "capture"
    store = CaptureStore(folder, CaptureConfig(capture_dir=str(folder), capture="random", capture_random=1.0))
    first = store.keep("a.png", _png(1), {"digits": {"label": "3", "confidence": 0.4}}, {"digits": manifest}, set())
    index = folder / "index.jsonl"
    whole = index.read_bytes()
    index.write_bytes(whole + whole[: len(whole) // 2])  # a crash in the middle of the next line's write
    again = CaptureStore(folder, CaptureConfig(capture_dir=str(folder), capture="random", capture_random=1.0))
    second = again.keep("b.png", _png(2), {"digits": {"label": "3", "confidence": 0.4}}, {"digits": manifest}, set())
    last = CaptureStore(folder, CaptureConfig(capture_dir=str(folder)))
    assert {first, second} <= set(last.entries) and last.skipped_lines == 1
    assert last.used == _on_disk(folder)


def test_an_audit_log_cut_short_in_appends_and_rotations_keeps_its_order(tmp_path):
    template = tmp_path / "template"
    template.mkdir()
    runs = 0
    for root, completed in crash_runs("audit", template, tmp_path, 12, most=80):
        lines = [line for name in ("audit.jsonl.1", "audit.jsonl") if (root / name).exists()
                 for line in (root / name).read_text().splitlines()]
        numbers = [json.loads(line)["n"] for line in lines]  # every line whole
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers))) if numbers else root.name.endswith("-0")
        assert all((root / name).stat().st_size <= 200 + 60 for name in ("audit.jsonl", "audit.jsonl.1")
                   if (root / name).exists())  # bounded: it rotated
        runs += 1
        if completed:
            assert numbers[-1] == 11
    assert runs > 12


def test_an_append_log_starts_a_new_line_after_a_torn_one(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"n": 1}\n{"n": 2, "pa')
    log = AppendLog(path, sync=False)
    assert log.append(b'{"n": 3}\n') == len(b'{"n": 3}\n') + 1
    assert path.read_bytes().splitlines()[-1] == b'{"n": 3}'
    assert AppendLog(path).append(b'{"n": 4}\n') == 9  # a whole last line: nothing added before it


@pytest.fixture(scope="module")
def hub_keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hub-keys")
    for name in ("root", "release", "release2"):
        generate_keypair(folder / name)
    return folder


def tuf_refresh(hub: Path, trusted: Path, tmp: Path):
    """A station's first refresh from the hub's first root: the targets it trusts."""
    from tuf.ngclient import Updater

    from conftest import FolderFetcher

    (tmp / "metadata").mkdir(parents=True)
    shutil.copyfile(trusted, tmp / "metadata" / "root.json")
    updater = Updater(str(tmp / "metadata"), "http://hub/metadata/", str(tmp / "targets"), "http://hub/targets/",
                      fetcher=FolderFetcher(hub), bootstrap=None)
    updater.refresh()
    return updater


def test_a_hub_init_cut_short_anywhere_leaves_no_hub_or_a_whole_one(tmp_path, hub_keys):
    from petah.fleet.hub import Hub
    from petah.fleet.metadata import init_repository

    template = tmp_path / "template"
    template.mkdir()
    steps = 0
    for root, completed in crash_runs("hub-init", template, tmp_path, hub_keys):
        hub = root / "hub"
        if not (hub / "metadata").exists():  # no hub: init runs again, and cleans up after the killed one
            assert not completed
            init_repository(hub, hub_keys / "root.key", hub_keys / "release.key")
        Hub(hub).registry.close()
        tuf_refresh(hub, hub / "metadata" / "1.root.json", root / "station")
        assert sorted(p.name for p in hub.iterdir() if p.name.startswith(".init-")) == []
        steps += 1
    assert steps >= 6


def test_a_key_rotation_cut_short_anywhere_is_finished_or_never_happened(tmp_path, hub_keys):
    from petah.fleet.client import sign_release
    from petah.fleet.hub import Hub
    from petah.fleet.metadata import init_repository, rotate_targets_key

    template = tmp_path / "template"
    init_repository(template / "hub", hub_keys / "root.key", hub_keys / "release.key")
    hub = Hub(template / "hub")
    data, targets = sign_release(DIGITS, hub.repository.current_targets(), hub_keys / "release.key")
    target = hub.publish(data, targets, {})["target"]
    hub.registry.close()
    outcomes = set()
    for root, _completed in crash_runs("hub-rotate", template, tmp_path, hub_keys):
        started = Hub(root / "hub")  # a start finishes a journaled rotation
        started.registry.close()
        updater = tuf_refresh(root / "hub", root / "hub" / "metadata" / "1.root.json", root / "station")
        assert updater.get_targetinfo(target) is not None  # the release is still there, under either key
        outcomes.add(started.repository.latest("root").signed.version)
        assert rotate_targets_key(root / "hub", hub_keys / "root.key", hub_keys / "release2.key") == 2  # a rerun
        tuf_refresh(root / "hub", root / "hub" / "metadata" / "1.root.json", root / "again")
    assert outcomes == {1, 2}  # cut before the journal: as before; after it: finished at the start
