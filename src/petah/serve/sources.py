"""Where a station's images come from besides HTTP uploads: camera streams, video files and
watched folders (``petah serve --source NAME=URI[,tasks=a+b][,fps=N][,loop][,after=move|leave]``).

**Streams** (``rtsp://``, ``http(s)://`` MJPEG or any stream FFmpeg reads, a video file,
``/dev/videoN``) are decoded by an ``ffmpeg`` process (Debian's ``ffmpeg`` package) writing raw RGB
frames (PPM: each with its size) into a pipe that a thread of the station reads. Chosen over PyAV and OpenCV by install
size: the PyAV wheel installs 102 MB of its own FFmpeg, OpenCV's headless wheel 173 MB, against a
314 MB device install; the ``ffmpeg`` command is the same FFmpeg, decodes in its own process
(its CPU is measured apart, and a decoder crash cannot take the station down) and is on most
camera PCs already. **Latest frame**: the reading thread keeps only the newest frame; the
inference loop always takes the newest, and every frame overwritten before it was taken is
counted as dropped, so a model slower than the camera answers for frames at most one inference +
one frame interval old. A stream that ends, fails or stalls (no frame for ``STALL_S``) is
reconnected with backoff; a video file plays at its own rate, and ``loop`` plays it again.

``width=N`` has the decoder scale frames to N pixels wide (aspect kept) before they reach the
station: a 1280x720 camera feeding a 64-pixel model need not move and resize full frames (regions,
boxes and masks are then in the scaled frame's pixels).

**Regions** (``region=NAME:X:Y:W:H[:TASK+TASK]``, repeatable): each frame or file is answered
as those crops (pixels of the source's frame), each with its own tasks (default: the source's),
instead of whole. **Triggers** (``trigger``, or ``trigger=mqtt(s)://BROKER/TOPIC``): a stream is
decoded all the time (so the camera connection stays live), but answered only once per trigger —
an HTTP call (``POST /v1/sources/NAME/trigger``) or an MQTT message from the line's controller —
on the first frame decoded after the trigger arrived, as a part arriving drives an inspection
station. The trigger's id (the message's ``{"id": …}`` or its text) is carried into the results.

**Folders** (``folder:PATH`` or a folder's path): an image file is taken once it is complete — its
size and modification time unchanged over ``SETTLE_S`` (a camera that writes in parts) — or at
once when renamed into place; temp and hidden names are left alone. After the answer it is moved
to ``PATH/done/`` (``PATH/failed/`` with a ``.error.txt`` beside it for a file petah cannot
read), or with ``after=leave`` left where it is and noted in the source's journal in the state
dir, so a restart does not answer it again.
"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from petah.errors import PetahError
from petah.files import AppendLog
from petah.serve.mqtt import check_uri, shown

STALL_S = 10.0
SETTLE_S = 0.5
POLL_S = 0.2
BACKOFF_S = (0.5, 1, 2, 5, 10, 30)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
STREAM_SCHEMES = ("rtsp", "rtsps", "rtmp", "http", "https", "udp", "tcp", "srt")
TEMP_NAME = re.compile(r"^\.|\.(tmp|part|partial|crdownload|filepart)$|~$", re.IGNORECASE)


@dataclass(frozen=True)
class Region:
    """A crop of a source's frames, answered with its own tasks."""

    name: str
    box: tuple[int, int, int, int]  # x, y, width, height in the frame's pixels
    tasks: tuple[str, ...] | None = None

    @classmethod
    def parse(cls, source: str, text: str) -> Region:
        name, *fields = text.split(":")
        usage = f"--source {source}: write region=NAME:X:Y:W:H[:TASK+TASK], got region={text!r}"
        if not NAME.fullmatch(name) or len(fields) not in (4, 5):
            raise PetahError(usage)
        try:
            x, y, w, h = (int(f) for f in fields[:4])
        except ValueError:
            raise PetahError(usage) from None
        if x < 0 or y < 0 or w < 1 or h < 1:
            raise PetahError(f"--source {source}: region {name} must lie in the frame with a positive size")
        tasks = tuple(t for t in fields[4].split("+") if t) if len(fields) == 5 else ()
        return cls(name, (x, y, w, h), tasks or None)

    def crop(self, image: np.ndarray) -> np.ndarray:
        """The region of a (C, H, W) image; refused when it does not lie inside."""
        x, y, w, h = self.box
        if x + w > image.shape[-1] or y + h > image.shape[-2]:
            raise PetahError(f"region {self.name} ({x},{y} {w}x{h}) is outside the "
                             f"{image.shape[-1]}x{image.shape[-2]} frame")
        return np.ascontiguousarray(image[..., y:y + h, x:x + w])

    def to_dict(self) -> dict:
        return {"name": self.name, "box": list(self.box), "tasks": list(self.tasks) if self.tasks else None}


@dataclass
class SourceSpec:
    """One ``--source``."""

    name: str
    uri: str
    tasks: tuple[str, ...] | None = None
    fps: float | None = None
    width: int | None = None  # frames scaled by the decoder to this width (aspect kept)
    loop: bool = False
    after: str = "move"
    regions: tuple[Region, ...] = ()
    trigger: str | None = None  # "http" (calls only) or an mqtt(s):// URI whose messages also trigger

    @classmethod
    def parse(cls, text: str) -> SourceSpec:
        name, equals, rest = text.partition("=")
        if not equals or not NAME.fullmatch(name):
            raise PetahError(f"--source {text!r}: write NAME=URI (a name of letters, digits, . _ -)")
        uri, *options = [part.strip() for part in rest.split(",")]
        if not uri:
            raise PetahError(f"--source {name}: names no URI")
        spec = cls(name, uri)
        for option in options:
            key, _, value = option.partition("=")
            if key == "tasks" and value:
                spec.tasks = tuple(t for t in value.split("+") if t)
            elif key == "fps":
                try:
                    spec.fps = float(value)
                except ValueError:
                    spec.fps = -1
                if not 0 < spec.fps <= 240:
                    raise PetahError(f"--source {name}: fps must be a number in (0, 240], got {value!r}")
            elif key == "width":
                if not value.isdigit() or not 16 <= int(value) <= 8192:
                    raise PetahError(f"--source {name}: width must be a whole number of pixels in [16, 8192], "
                                     f"got {value!r}")
                spec.width = int(value)
            elif key == "loop" and not value:
                spec.loop = True
            elif key == "after" and value in ("move", "leave"):
                spec.after = value
            elif key == "region":
                spec.regions += (Region.parse(name, value),)
            elif key == "trigger" and not value:
                spec.trigger = "http"
            elif key == "trigger" and value.split("://", 1)[0] in ("mqtt", "mqtts"):
                spec.trigger = value
            else:
                raise PetahError(f"--source {name}: unknown option {option!r} (tasks=a+b, fps=N, loop, "
                                 "width=N, after=move|leave, region=NAME:X:Y:W:H[:a+b], trigger[=mqtt://BROKER/TOPIC])")
        if len({r.name for r in spec.regions}) != len(spec.regions):
            raise PetahError(f"--source {name}: two regions have one name")
        if spec.trigger and spec.kind == "folder":
            raise PetahError(f"--source {name}: a folder is answered file by file; triggers are for streams")
        if spec.width and spec.kind == "folder":
            raise PetahError(f"--source {name}: width= scales a stream's frames; a folder's files are taken whole")
        if spec.trigger and spec.trigger != "http":
            check_uri(spec.trigger, f"--source {name}: trigger")
        if "://" in spec.uri:
            try:
                urllib.parse.urlsplit(spec.uri).port  # noqa: B018 - a port that is not a number is refused now
            except ValueError:
                raise PetahError(f"--source {name}: the port of {shown(spec.uri)!r} is not a number") from None
        spec.kind  # noqa: B018 - refuses an unknown kind of URI now, not at start
        return spec

    @property
    def kind(self) -> str:
        if self.uri.startswith("folder:"):
            return "folder"
        scheme = self.uri.split("://", 1)[0].lower() if "://" in self.uri else ""
        if scheme in STREAM_SCHEMES or self.uri.startswith("file:") or self.uri.startswith("/dev/video"):
            return "stream"
        path = Path(self.uri)
        if path.is_dir():
            return "folder"
        if path.is_file():
            return "stream"  # a video file
        if scheme:
            raise PetahError(f"--source {self.name}: {scheme}:// is not a stream petah reads "
                             f"({', '.join(STREAM_SCHEMES)}, a video file, a folder)")
        raise PetahError(f"--source {self.name}: {self.uri} is neither a folder, a video file nor a stream URL")

    @property
    def folder(self) -> Path:
        return Path(self.uri[len("folder:"):] if self.uri.startswith("folder:") else self.uri)

    @property
    def shown_uri(self) -> str:
        """The URI without a password (for pages and logs)."""
        return shown(self.uri)

    def to_dict(self) -> dict:
        return {"uri": self.uri, "tasks": list(self.tasks) if self.tasks else None, "fps": self.fps,
                "width": self.width, "loop": self.loop, "after": self.after,
                "regions": [r.to_dict() for r in self.regions], "trigger": self.trigger}

    @classmethod
    def from_dict(cls, name: str, data: dict) -> SourceSpec:
        """From an admin request's JSON (or the state dir's copy): checked as ``--source`` is."""
        if not isinstance(data, dict) or not isinstance(data.get("uri"), str):
            raise PetahError('a source is {"uri": "...", "tasks": [...], "fps": N, "loop": false, '
                             '"after": "move"}')
        tasks, fps, trigger, width = data.get("tasks"), data.get("fps"), data.get("trigger"), data.get("width")
        regions = data.get("regions") or []

        def names(value) -> bool:
            return value is None or (isinstance(value, list) and all(isinstance(t, str) for t in value))

        if not names(tasks):
            raise PetahError("tasks must be a list of task names")
        if fps is not None and not isinstance(fps, int | float):
            raise PetahError("fps must be a number")
        if width is not None and (isinstance(width, bool) or not isinstance(width, int)):
            raise PetahError("width must be a whole number of pixels")
        if trigger is not None and not isinstance(trigger, str):
            raise PetahError('trigger must be "http" or an mqtt:// URI')
        if not isinstance(regions, list) or not all(
                isinstance(r, dict) and isinstance(r.get("name"), str) and names(r.get("tasks"))
                and isinstance(r.get("box"), list) and len(r["box"]) == 4
                and all(isinstance(v, int) for v in r["box"]) for r in regions):
            raise PetahError('regions must be a list of {"name": "...", "box": [x, y, w, h], "tasks": [...]}')
        words = [data["uri"], trigger or "", *(tasks or [])]
        words += [w for r in regions for w in [r["name"], *(r.get("tasks") or [])]]
        if any("," in w for w in words) or any("+" in t or ":" in t for t in tasks or []):
            raise PetahError("a source's URI, task and region names hold no commas")
        options = ([f"tasks={'+'.join(tasks)}"] if tasks else []) + ([f"fps={fps:g}"] if fps is not None else [])
        options += [f"width={width}"] if width is not None else []
        options += (["loop"] if data.get("loop") is True else []) + [f"after={data.get('after', 'move')}"]
        options += [f"region={r['name']}:{':'.join(map(str, r['box']))}"
                    + (f":{'+'.join(r['tasks'])}" if r.get("tasks") else "") for r in regions]
        options += ([] if trigger is None else ["trigger"] if trigger == "http" else [f"trigger={trigger}"])
        return cls.parse(",".join([f"{name}={data['uri']}", *options]))


@dataclass
class Item:
    """One frame or file to answer."""

    number: int
    time: float  # when it was decoded or found (seconds since the epoch)
    image: np.ndarray | None = None  # a frame: (3, H, W) uint8
    data: bytes | None = None  # a file's bytes
    path: Path | None = None


def widen_pipe(fd: int, size: int = 1 << 20) -> None:
    """Let a frame pass the pipe in one piece (Linux; 64 KB by default): a 640x480 frame then takes
    one or two reads, not fifteen — measured, the reads' GIL hand-offs slowed the inference thread."""
    import fcntl

    try:
        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), size)
    except OSError:
        pass  # past /proc/sys/fs/pipe-max-size, or not Linux: the default pipe works, only slower


def process_cpu_s(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


class StreamSource:
    """A stream or video file decoded by ``ffmpeg`` on its own process; the newest frame kept."""

    def __init__(self, spec: SourceSpec, max_pixels: int):
        if shutil.which("ffmpeg") is None:
            raise PetahError(f"--source {spec.name}: streams are decoded by ffmpeg, which this machine lacks "
                             "(apt-get install ffmpeg)")
        self.spec, self.max_pixels = spec, max_pixels
        self.state, self.error = "connecting", None
        self.counts = {"decoded": 0, "taken": 0, "dropped": 0, "reconnects": 0}
        self.size: tuple[int, int] | None = None
        self._latest: Item | None = None
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._proc: subprocess.Popen | None = None
        self._cpu_done = 0.0
        self._last_frame = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=f"petah-source-{spec.name}", daemon=True)
        self._watchdog = threading.Thread(target=self._watch, name=f"petah-source-{spec.name}-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._watchdog.start()

    @property
    def _input(self) -> list[str]:
        uri = self.spec.uri[len("file:"):] if self.spec.uri.startswith("file:") else self.spec.uri
        args = []
        if uri.startswith(("rtsp://", "rtsps://")):
            args += ["-rtsp_transport", "tcp"]
        if uri.startswith("/dev/video"):
            args += ["-f", "v4l2"]
        elif "://" not in uri:  # a file: played at its own rate, as a camera would send it
            args += ["-re"] + (["-stream_loop", "-1"] if self.spec.loop else [])
        return args + ["-i", uri]

    def _attempt(self) -> str:
        """One ffmpeg run, reading its frames until it ends; why it ended."""
        filters = ([f"fps={self.spec.fps:g}"] if self.spec.fps else []) + (
            [f"scale={self.spec.width}:-2"] if self.spec.width else [])  # scaled before the pipe: cheaper downstream
        fps = ["-vf", ",".join(filters)] if filters else []
        with tempfile.TemporaryFile() as errors:  # a file, not a pipe: a pipe nobody reads could fill and stall it
            # PPM frames: each says its own size (no probe, and a size change mid-stream is fine)
            proc = subprocess.Popen(["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", *self._input, "-an",
                                     "-sn", *fps, "-f", "image2pipe", "-c:v", "ppm", "pipe:1"],
                                    stdout=subprocess.PIPE, stderr=errors)
            self._proc = proc
            widen_pipe(proc.stdout.fileno())
            try:
                self._last_frame = time.monotonic()
                self._read_frames(proc)
            finally:
                cpu = process_cpu_s(proc.pid)  # before reaping: a zombie still has its numbers
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
                proc.stdout.close()
                self._cpu_done += cpu
            errors.seek(max(0, errors.seek(0, os.SEEK_END) - 4096))
            tail = errors.read().decode(errors="replace").strip().splitlines()
        return tail[-1][:300] if tail else "the stream ended"

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            decoded_before = self.counts["decoded"]
            try:
                reason = self._attempt()
            except (PetahError, OSError) as exc:
                reason = str(exc) or type(exc).__name__
            if self._stop.is_set():
                break
            failures = 1 if self.counts["decoded"] > decoded_before else failures + 1
            self.state, self.error = "reconnecting", reason
            self.counts["reconnects"] += 1
            self._stop.wait(BACKOFF_S[min(failures, len(BACKOFF_S)) - 1])
        self.state = "stopped"

    def _read_exactly(self, stream, size: int) -> bytearray | None:
        buffer = bytearray(size)
        view, got = memoryview(buffer), 0
        while got < size:
            n = stream.readinto(view[got:])
            if not n:
                return None
            got += n
        return buffer

    def _read_frames(self, proc: subprocess.Popen) -> None:
        while not self._stop.is_set():
            header = b"".join(proc.stdout.readline(64) for _ in range(3))  # b"P6\nW H\n255\n"
            if not header:
                return
            fields = header.split()
            if len(fields) != 4 or fields[0] != b"P6" or fields[3] != b"255":
                raise PetahError("ffmpeg sent something that is not a frame")
            width, height = int(fields[1]), int(fields[2])
            if not 0 < width * height <= self.max_pixels:
                raise PetahError(f"its frames are {width}x{height}: over the station's limit of "
                                 f"{self.max_pixels / 1e6:g} MP (--max-request-mp)")
            body = self._read_exactly(proc.stdout, width * height * 3)
            if body is None:
                return
            now = time.time()
            self.size = (width, height)
            image = np.frombuffer(body, np.uint8).reshape(height, width, 3).transpose(2, 0, 1)
            with self._cond:
                if self._latest is not None and not self.spec.trigger:
                    self.counts["dropped"] += 1  # never taken: a newer frame replaces it
                self.counts["decoded"] += 1
                self._latest = Item(self.counts["decoded"], now, image=image)
                self.state, self.error = "streaming", None
                self._cond.notify_all()
            self._last_frame = time.monotonic()

    def _watch(self) -> None:
        while not self._stop.wait(1.0):
            proc = self._proc
            if proc is not None and proc.poll() is None and time.monotonic() - self._last_frame > STALL_S:
                self.error = f"no frame for {STALL_S:g} s"
                proc.kill()  # the reading thread sees the end and reconnects

    def take(self, timeout: float, after: float | None = None) -> Item | None:
        """The newest frame not yet taken (waits up to ``timeout``); with ``after`` (a trigger's
        time), the first one decoded at or after it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while (self._latest is None or (after is not None and self._latest.time < after)) \
                    and not self._stop.is_set() and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            item = self._latest
            if item is None or (after is not None and item.time < after):
                return None
            self._latest = None
            self.counts["taken"] += 1
            return item

    def finish(self, item: Item, error: str | None) -> None:
        if error:
            self.error = error

    def ready(self) -> bool:
        return self._latest is not None

    @property
    def decode_cpu_s(self) -> float:
        proc = self._proc
        live = process_cpu_s(proc.pid) if proc is not None and proc.poll() is None else 0.0
        return self._cpu_done + live

    def status(self) -> dict:
        return {"name": self.spec.name, "kind": "stream", "uri": self.spec.shown_uri, "state": self.state,
                "error": self.error, "size": list(self.size) if self.size else None,
                "decode_cpu_s": round(self.decode_cpu_s, 2), **self.counts}

    def stop(self) -> None:
        self._stop.set()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(10)
        self._watchdog.join(5)


class FolderSource:
    """A watched folder: complete image files are answered once, then moved (or noted)."""

    def __init__(self, spec: SourceSpec, journal: Path):
        self.spec, self.folder = spec, spec.folder
        if not self.folder.is_dir():
            raise PetahError(f"--source {spec.name}: {self.folder} is not a folder")
        self.state, self.error = "watching", None
        self.counts = {"found": 0, "answered": 0, "failed": 0}
        self._seen: dict[str, tuple[int, int, float]] = {}  # name -> (size, mtime_ns, first seen unchanged)
        self._journal_path = journal
        self._done: set[tuple] = self._read_journal() if spec.after == "leave" else set()
        if spec.after == "leave":
            journal.parent.mkdir(parents=True, exist_ok=True)
        self._journal = AppendLog(journal) if spec.after == "leave" else None
        self._queue: collections.deque[Item] = collections.deque()
        self._queued: set[str] = set()
        self._stop = threading.Event()
        self._number = 0

    def _read_journal(self) -> set[tuple]:
        done = set()
        try:
            lines = self._journal_path.read_bytes().splitlines()
        except FileNotFoundError:
            return done
        for line in lines:
            try:
                item = json.loads(line)
                done.add((str(item["name"]), int(item["size"]), int(item["mtime_ns"])))
            except (ValueError, KeyError, TypeError):
                continue  # a torn line: that file is answered again (at least once)
        return done

    def start(self) -> None:
        pass

    def _scan(self) -> None:
        now = time.monotonic()
        try:
            entries = list(os.scandir(self.folder))
        except OSError as exc:
            self.state, self.error = "error", f"cannot list the folder ({exc.strerror or exc})"
            return
        self.state = "watching" if self.state == "error" else self.state
        present = set()
        for entry in sorted(entries, key=lambda e: e.name):
            name = entry.name
            if (TEMP_NAME.search(name) or Path(name).suffix.lower() not in IMAGE_SUFFIXES
                    or not entry.is_file(follow_symlinks=False) or name in self._queued):
                continue
            present.add(name)
            stat = entry.stat(follow_symlinks=False)
            key = (stat.st_size, stat.st_mtime_ns)
            if (name, *key) in self._done:
                continue
            seen = self._seen.get(name)
            if seen is None or seen[:2] != key:
                self._seen[name] = (*key, now)
                continue
            if now - seen[2] >= SETTLE_S and stat.st_size > 0:
                self._number += 1
                self.counts["found"] += 1
                self._queue.append(Item(self._number, time.time(), path=Path(entry.path)))
                self._queued.add(name)
                del self._seen[name]
        for gone in set(self._seen) - present:
            del self._seen[gone]

    def take(self, timeout: float) -> Item | None:
        deadline = time.monotonic() + timeout
        while not self._queue and not self._stop.is_set():
            self._scan()
            if self._queue or time.monotonic() >= deadline:
                break
            self._stop.wait(POLL_S)
        if not self._queue:
            return None
        item = self._queue.popleft()
        try:
            item.data = item.path.read_bytes()
        except OSError as exc:
            self._queued.discard(item.path.name)
            self.error = f"cannot read {item.path.name} ({exc.strerror or exc})"
            return None
        return item

    def finish(self, item: Item, error: str | None) -> None:
        """After the answer (or the refusal): move the file on, or note it."""
        name = item.path.name
        self._queued.discard(name)
        self.counts["failed" if error else "answered"] += 1
        if error:
            self.error = f"{name}: {error}"
        try:
            stat = item.path.stat()
        except OSError:
            return  # gone meanwhile (the camera software took it back)
        key = (name, stat.st_size, stat.st_mtime_ns)
        self._done.add(key)  # never answered twice by this process, even where it cannot be moved
        try:
            if self.spec.after == "leave":
                self._journal.append(json.dumps({"name": name, "size": key[1], "mtime_ns": key[2],
                                                 "error": error}).encode() + b"\n")
                return
            target_dir = self.folder / ("failed" if error else "done")
            target_dir.mkdir(exist_ok=True)
            target = target_dir / name
            stem, suffix, n = Path(name).stem, Path(name).suffix, 1
            while target.exists():  # never over a file already there
                target, n = target_dir / f"{stem}.{n}{suffix}", n + 1
            os.rename(item.path, target)
            self._done.discard(key)
            if error:
                (target_dir / (target.name + ".error.txt")).write_text(error + "\n")
        except OSError as exc:
            self.state, self.error = "error", f"cannot move {name} on ({exc.strerror or exc})"

    def ready(self) -> bool:
        return bool(self._queue)

    def status(self) -> dict:
        return {"name": self.spec.name, "kind": "folder", "uri": self.spec.shown_uri, "state": self.state,
                "error": self.error, "waiting": len(self._queue), **self.counts}

    def stop(self) -> None:
        self._stop.set()


__all__ = ["FolderSource", "Item", "SourceSpec", "StreamSource", "process_cpu_s"]
