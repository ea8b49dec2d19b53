"""Run one durable operation of petah in this process and die (``os._exit``, as ``kill -9`` would
leave it) just before its ``LIMIT + 1``-th file-system step: an open for writing, a write's sync,
a rename, a removal inside ROOT. ``tests/test_crash_points.py`` runs it for every LIMIT until the
operation completes (exit 0) and checks what a restart finds after each crash.

    python tests/crash_child.py OPERATION ROOT LIMIT [ARGS...]
"""

from __future__ import annotations

import builtins
import io
import os
import sys
from pathlib import Path

CRASHED = 86  # the exit status of a crash this script made (0: the operation completed)


def arm(root: Path, limit: int) -> None:
    """Count file-system steps from here on; die before step ``limit + 1``."""
    prefix, steps = str(root.resolve()), [0]

    def step() -> None:
        steps[0] += 1
        if steps[0] > limit:
            os._exit(CRASHED)

    def ours(path) -> bool:
        return isinstance(path, str | os.PathLike) and os.path.abspath(os.fspath(path)).startswith(prefix)

    def counted(real, path_args=(0,)):
        def hooked(*args, **kwargs):
            if not path_args or any(ours(args[i]) for i in path_args if i < len(args)):
                step()
            return real(*args, **kwargs)
        return hooked

    real_open, real_os_open = io.open, os.open

    def opened(file, mode="r", *args, **kwargs):
        if ours(file) and any(c in mode for c in "wax+"):
            step()
        return real_open(file, mode, *args, **kwargs)

    def os_opened(path, flags, *args, **kwargs):
        if ours(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            step()
        return real_os_open(path, flags, *args, **kwargs)

    io.open = builtins.open = opened
    os.open = os_opened
    os.fsync = counted(os.fsync, ())
    for name in ("replace", "rename", "unlink", "rmdir"):
        setattr(os, name, counted(getattr(os, name)))


def install(root: Path, package: Path) -> None:
    """A station on ROOT/state installs PACKAGE (the device engine, as on a device)."""
    from petah.serve import ServeConfig, demo_device_backbone
    from petah.serve.station import Station

    station = Station(demo_device_backbone(), root / "state", ServeConfig(engine="device", threads=1))
    data = package.read_bytes()
    arm(root, LIMIT)
    station.install(data)


def rollback(root: Path, task: Path) -> None:
    from petah.serve import ServeConfig, demo_device_backbone
    from petah.serve.station import Station

    station = Station(demo_device_backbone(), root / "state", ServeConfig(engine="device", threads=1))
    arm(root, LIMIT)
    station.rollback(task.name)


def capture(root: Path, image: Path, package: Path) -> None:
    """The capture store keeps IMAGE with an answer of PACKAGE's task, then an operator corrects it."""
    from petah.packages import read_manifest
    from petah.serve.capture import CaptureConfig, CaptureStore

    manifest = read_manifest(package)
    store = CaptureStore(root / "capture", CaptureConfig(capture_dir=str(root / "capture"), capture="random",
                                                         capture_random=1.0))
    data = image.read_bytes()
    labels = list(manifest.labels)
    arm(root, LIMIT)
    capture_id = store.keep("new.png", data, {"digits": {"label": labels[0], "confidence": 0.4}},
                            {"digits": manifest}, set())
    store.review(capture_id, "digits", label=labels[1])


def audit(root: Path, count: Path) -> None:
    """COUNT lines appended to an audit log that rotates every few lines."""
    from petah.files import AppendLog

    log = AppendLog(root / "audit.jsonl", max_bytes=200)
    arm(root, LIMIT)
    for i in range(int(count.name)):
        log.append(f'{{"n": {i}, "pad": "{"x" * 40}"}}\n'.encode())


def hub_init(root: Path, keys: Path) -> None:
    """``petah hub init`` of ROOT/hub with KEYS/root.key and KEYS/release.key."""
    from petah.fleet.metadata import init_repository

    arm(root, LIMIT)
    init_repository(root / "hub", keys / "root.key", keys / "release.key")


def hub_rotate(root: Path, keys: Path) -> None:
    """``petah hub rotate-key`` of ROOT/hub to KEYS/release2.key."""
    from petah.fleet.metadata import rotate_targets_key

    arm(root, LIMIT)
    rotate_targets_key(root / "hub", keys / "root.key", keys / "release2.key")


if __name__ == "__main__":
    operation, ROOT, LIMIT = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    {"install": install, "rollback": rollback, "capture": capture, "audit": audit, "hub-init": hub_init,
     "hub-rotate": hub_rotate}[operation](ROOT, *map(Path, sys.argv[4:]))
    sys.exit(0)
