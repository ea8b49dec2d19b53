"""The line: sources feed the station's batching worker, results go to the sinks
(``petah.serve.sources``, ``petah.serve.sinks``).

One thread per source takes its newest frame (or next file), submits it to the same batching
worker HTTP uploads use (so streams, folders and requests share batches and the one backbone),
and hands every task's answer to each sink. A source that fails, or a task it names that is not
served, shows as the source's error; the station keeps serving.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from petah.errors import PetahError
from petah.files import atomic_write_bytes
from petah.imaging import INTENSITY_MODES
from petah.options import option
from petah.serve.metrics import quantile_ms
from petah.serve.sinks import Sink, SinkSpec, result_record
from petah.serve.sources import FolderSource, Item, SourceSpec, StreamSource
from petah.serve.worker import Job, Upload

logger = logging.getLogger("petah.serve")


@dataclass
class LineConfig:
    sources: list[str] = option(default_factory=list, cli="--source", cli_type=list[str],
                                help="NAME=URI[,tasks=a+b][,fps=N][,loop][,after=move|leave]: a camera stream "
                                     "(rtsp://, http:// MJPEG, /dev/videoN), a video file or a watched folder "
                                     "(folder:PATH) whose images the station answers (repeatable).")
    sinks: list[str] = option(default_factory=list, cli="--sink", cli_type=list[str],
                              help="URI[,when=TASK:LABEL|LABEL][,min-score=S][,name=N]: mqtt://HOST[:PORT]/TOPIC "
                                   "(mqtts:// for TLS, user:password@ for credentials), http(s)://… (POST) or "
                                   "jsonl:FILE; every source result goes to each (repeatable).")
    sink_queue_mb: float = option(64.0, cli="--sink-queue-mb",
                                  help="Results a sink that is down keeps queued on disk; past it new ones are "
                                       "dropped (and counted).")
    mqtt_ca: str | None = option(None, cli="--mqtt-ca", help="CA certificates (PEM) an mqtts:// broker is checked "
                                                             "against (default: the system's).")

    def __post_init__(self):
        self.source_specs = [SourceSpec.parse(text) for text in self.sources or []]
        self.sink_specs = [SinkSpec.parse(text, i) for i, text in enumerate(self.sinks or [])]
        names = [s.name for s in self.source_specs]
        if len(set(names)) != len(names):
            raise PetahError("--source: two sources have one name")
        sink_names = [s.name for s in self.sink_specs]
        if len(set(sink_names)) != len(sink_names):
            raise PetahError("--sink: two sinks have one name (name=N)")
        if not 0 < self.sink_queue_mb <= 2**20:
            raise PetahError(f"--sink-queue-mb must be a positive number of MB, got {self.sink_queue_mb}")

    @property
    def active(self) -> bool:
        return bool(self.source_specs or self.sink_specs)


@dataclass
class SourceRun:
    source: object
    thread: threading.Thread | None = None
    latency: list = field(default_factory=list)  # recent frame-to-answer seconds
    last: tuple | None = None  # (item, prediction) of the newest answer, for the page
    stopping: bool = False


def _png(image) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image.transpose(1, 2, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


class Line:
    """Sources and sinks of one station (started and stopped with it). Sources added through the
    admin API are kept in ``STATE/line.json`` and come back after a restart (a ``--source`` of the
    same name wins over the kept one)."""

    def __init__(self, station, config: LineConfig, state_root: Path):
        self.station, self.config, self.state_root = station, config, state_root
        self.file = state_root / "line.json"
        self.max_pixels = int(station.config.max_request_mp * 1e6)
        self.sinks = [Sink(spec, state_root / "sinks" / spec.name, int(config.sink_queue_mb * 2**20), config.mqtt_ca)
                      for spec in config.sink_specs]
        self.runs: dict[str, SourceRun] = {}
        self.kept: dict[str, dict] = self._read_kept()  # the API's sources, as stored
        self._changes = threading.Lock()
        self._stop = threading.Event()
        self._started = False
        try:
            given = {spec.name: spec for spec in config.source_specs}
            for name, data in self.kept.items():
                if name not in given:
                    given[name] = SourceSpec.from_dict(name, data)
            for spec in given.values():
                self.runs[spec.name] = SourceRun(self._source(spec))
        except BaseException:
            for sink in self.sinks:
                sink.close()
            raise

    def _read_kept(self) -> dict[str, dict]:
        try:
            data = json.loads(self.file.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise PetahError(f"state dir: line.json cannot be read ({exc}); move it away to start without the "
                             "sources it keeps") from None
        sources = data.get("sources") if isinstance(data, dict) else None
        return {str(k): v for k, v in sources.items()} if isinstance(sources, dict) else {}

    def _source(self, spec: SourceSpec):
        if spec.kind == "folder":
            return FolderSource(spec, self.state_root / "sources" / f"{spec.name}.jsonl")
        return StreamSource(spec, self.max_pixels)

    def _launch(self, name: str, run: SourceRun) -> None:
        run.source.start()
        run.thread = threading.Thread(target=self._serve, args=(run,), name=f"petah-line-{name}", daemon=True)
        run.thread.start()

    def start(self) -> None:
        self._started = True
        for name, run in self.runs.items():
            self._launch(name, run)

    # --- changed through the admin API ----------------------------------------------------------
    def put_source(self, name: str, data: dict) -> dict:
        """Add or replace a source (and keep it for restarts); its status."""
        spec = SourceSpec.from_dict(name, data)
        with self._changes:
            source = self._source(spec)  # refused before the old one stops
            kept = {**self.kept, name: spec.to_dict()}
            atomic_write_bytes(self.file, json.dumps({"sources": kept}, indent=1).encode())
            self.kept = kept
            self._stop_run(self.runs.pop(name, None))
            run = self.runs[name] = SourceRun(source)
            if self._started:
                self._launch(name, run)
            return source.status()

    def delete_source(self, name: str) -> None:
        with self._changes:
            if name not in self.runs:
                raise KeyError(name)
            if name in self.kept:
                kept = {k: v for k, v in self.kept.items() if k != name}
                atomic_write_bytes(self.file, json.dumps({"sources": kept}, indent=1).encode())
                self.kept = kept
            self._stop_run(self.runs.pop(name))

    @staticmethod
    def _stop_run(run: SourceRun | None) -> None:
        if run is None:
            return
        run.stopping = True
        run.source.stop()
        if run.thread is not None:
            run.thread.join(10)

    def _job(self, item: Item, tasks: tuple[str, ...]) -> Job:
        if item.image is not None:  # a decoded frame: 8-bit, the same under every intensity mode
            return Job({mode: [item.image] for mode in INTENSITY_MODES}, tasks, 1, [])
        return self.station.decode([Upload(item.path.name, item.data)], tasks)

    def _serve(self, run: SourceRun) -> None:
        source, spec = run.source, run.source.spec
        while not self._stop.is_set() and not run.stopping:
            item = source.take(0.5)
            if item is None:
                continue
            error = None
            try:
                tasks = self.station.check_tasks(list(spec.tasks) if spec.tasks else None)
                prediction = self.station.answer(self._job(item, tasks))  # a stream's next frame waits too
                answered = time.time()
                run.latency = (run.latency + [answered - item.time])[-200:]
                run.last = (item, prediction)
                frame_id = item.number if item.path is None else item.path.name
                for task, row in prediction.results[0].items():
                    record = result_record(spec.name, item.time, frame_id, task,
                                           {**prediction.tags[task], **row}, answered - item.time)
                    for sink in self.sinks:
                        sink.put(record)
                if self.station.capture is not None:  # frames and files go through the strategies like uploads
                    rows = {task: {**prediction.tags[task], **row} for task, row in prediction.results[0].items()}
                    name = item.path.name if item.path is not None else f"{spec.name}-{item.number}.png"
                    data = item.data if item.data is not None else (lambda image=item.image: _png(image))
                    self.station.keep_capture(name, rows, data)
            except PetahError as exc:
                error = str(exc).splitlines()[0][:300]
            except Exception as exc:  # noqa: BLE001 - one bad frame or file must not stop the source
                logger.exception("source %s", spec.name)
                error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            source.finish(item, error)

    def latest(self, name: str) -> dict | None:
        """The newest answered frame of a source as JPEG with its answers (rendered only when asked)."""
        from PIL import Image

        run = self.runs.get(name)
        if run is None or run.last is None:
            return None
        item, prediction = run.last
        if item.image is not None:
            picture = Image.fromarray(item.image.transpose(1, 2, 0))
        else:
            picture = Image.open(io.BytesIO(item.data)).convert("RGB")
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=85)
        frame = item.number if item.path is None else item.path.name
        return {"source": name, "frame": frame, "frame_time": round(item.time, 3), "width": picture.width,
                "height": picture.height, "jpeg": base64.b64encode(buffer.getvalue()).decode("ascii"),
                "tasks": self.station.render(prediction, [Upload(str(frame), b"")])[0]["tasks"]}

    def status(self) -> dict:
        sources = []
        for run in self.runs.values():
            latencies = sorted(run.latency)
            sources.append({**run.source.status(), "tasks": list(run.source.spec.tasks or []) or "all",
                            "latency_ms": {"p50": quantile_ms(latencies, 0.5), "p99": quantile_ms(latencies, 0.99)}})
        return {"sources": sources, "sinks": [sink.status() for sink in self.sinks]}

    def stop(self) -> None:
        self._stop.set()
        for run in self.runs.values():
            run.source.stop()
        for run in self.runs.values():
            if run.thread is not None:
                run.thread.join(10)
        for sink in self.sinks:
            sink.close()


__all__ = ["Line", "LineConfig"]
