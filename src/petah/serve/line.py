"""The line: sources feed the station's batching worker, results go to the sinks
(``petah.serve.sources``, ``petah.serve.sinks``).

One thread per source takes its newest frame (or next file), submits it to the same batching
worker HTTP uploads use (so streams, folders and requests share batches and the one backbone),
and hands every task's answer to each sink. A source that fails, or a task it names that is not
served, shows as the source's error; the station keeps serving. A source with regions is answered
as its crops (one batch per set of tasks); a triggered source waits for its triggers (HTTP calls
and, with ``trigger=mqtt://…``, the messages of one topic), each answered on the first frame
decoded after it.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from petah.errors import PetahError
from petah.files import atomic_write_bytes
from petah.imaging import INTENSITY_MODES
from petah.options import option
from petah.serve import mqtt
from petah.serve.metrics import quantile_ms
from petah.serve.sinks import Sink, SinkSpec, result_record
from petah.serve.sources import FolderSource, Item, Region, SourceSpec, StreamSource
from petah.serve.worker import Job, Upload

logger = logging.getLogger("petah.serve")
TRIGGER_FRAME_S = 5.0  # a trigger with no frame decoded within this is answered with an error
TRIGGERS_WAITING = 64  # triggers queued beyond one being answered; more are refused (and counted)


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
    mqtt_ca: str | None = option(None, cli="--mqtt-ca", help="CA certificates (PEM) an mqtts:// broker (sinks and "
                                                             "triggers) is checked against (default: the system's).")

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
class Trigger:
    time: float  # when it arrived: it is answered on a frame decoded at or after it
    id: str | None
    future: Future = field(default_factory=Future)  # the records, for an HTTP caller


@dataclass
class SourceRun:
    source: object
    thread: threading.Thread | None = None
    latency: list = field(default_factory=list)  # recent frame-to-answer seconds
    last: tuple | None = None  # (item, [(region, prediction)]) of the newest answer, for the page
    stopping: bool = False
    busy: bool = False  # an item taken and not yet answered
    triggers: queue.Queue = field(default_factory=lambda: queue.Queue(TRIGGERS_WAITING))
    trigger_counts: dict = field(default_factory=lambda: {"triggers": 0, "refused": 0, "no_frame": 0})
    listener: mqtt.Connection | None = None  # the trigger topic's subscription

    def trigger(self, trigger_id: str | None) -> Trigger:
        if self.stopping:
            raise PetahError(f"source {self.source.spec.name} is stopping")
        trigger = Trigger(time.time(), trigger_id)
        try:
            self.triggers.put_nowait(trigger)
        except queue.Full:
            self.trigger_counts["refused"] += 1
            raise PetahError(f"{TRIGGERS_WAITING} triggers are waiting already; this one is refused") from None
        self.trigger_counts["triggers"] += 1
        return trigger


def _png(image) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image.transpose(1, 2, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def trigger_id(payload: bytes) -> str | None:
    """A trigger message's id: ``{"id": …}`` or the message's text (at most 128 characters)."""
    text = payload[:4096].decode("utf-8", errors="replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        data = text
    if isinstance(data, dict):
        data = data.get("id")
    return None if data in (None, "") else str(data)[:128]


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
        uri = run.source.spec.trigger
        if uri and uri != "http":
            def on_message(_client, _userdata, message, run=run):
                try:
                    run.trigger(trigger_id(message.payload))
                except PetahError as exc:
                    run.source.error = str(exc)

            run.listener = mqtt.Connection(uri, self.config.mqtt_ca, on_message=on_message,
                                           on_connect=lambda client: client.subscribe(mqtt.topic(uri), qos=1))

    def trigger(self, name: str, trigger_id: str | None) -> Trigger:
        """One trigger of a triggered source (from an HTTP call); its future gives the records."""
        run = self.runs.get(name)
        if run is None:
            raise KeyError(name)
        if not run.source.spec.trigger:
            raise PetahError(f"source {name} runs freely; add the trigger option to drive it by triggers")
        return run.trigger(trigger_id)

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
        if run.listener is not None:
            run.listener.close()
        run.source.stop()
        if run.thread is not None:
            run.thread.join(10)

    def _jobs(self, item: Item, spec: SourceSpec) -> list[tuple[list[Region | None], Job]]:
        """The item's jobs: the whole frame or file, or its regions grouped by their tasks."""
        groups: dict[tuple[str, ...], list[Region | None]] = {}
        for region in spec.regions or (None,):
            names = region.tasks if region is not None and region.tasks else spec.tasks
            groups.setdefault(self.station.check_tasks(list(names) if names else None), []).append(region)
        if item.image is not None:  # a decoded frame: 8-bit, the same under every intensity mode
            images = {mode: [item.image] for mode in INTENSITY_MODES}
        else:
            upload = Upload(item.path.name, item.data)
            if not spec.regions:
                ((tasks, regions),) = groups.items()
                return [(regions, self.station.decode([upload], tasks))]
            images = self.station.decode([upload], (), modes=INTENSITY_MODES).images  # crops cannot decode again
        if not spec.regions:
            ((tasks, regions),) = groups.items()
            return [(regions, Job(images, tasks, 1, []))]
        return [(regions, Job({mode: [r.crop(found[0]) for r in regions] for mode, found in images.items()},
                              tasks, len(regions), [])) for tasks, regions in groups.items()]

    def _answer(self, run: SourceRun, item: Item, trigger: Trigger | None) -> list[dict]:
        """Every task's answer on the item (each region's), handed to the sinks; the records."""
        spec = run.source.spec
        answered, records = [], []
        for regions, job in self._jobs(item, spec):
            prediction = self.station.answer(job)  # a stream's next frame waits too
            answered += [(region, prediction, i) for i, region in enumerate(regions)]
        now = time.time()
        since = now - (trigger.time if trigger is not None else item.time)
        run.latency = (run.latency + [since])[-200:]
        run.last = (item, answered)
        frame_id = item.number if item.path is None else item.path.name
        for region, prediction, i in answered:
            rows = {task: {**prediction.tags[task], **row} for task, row in prediction.results[i].items()}
            for task, row in rows.items():
                records.append(result_record(spec.name, item.time, frame_id, task, row, since,
                                             region.name if region else None, trigger.id if trigger else None))
            if self.station.capture is not None and region is None:  # frames and files, through the strategies
                name = item.path.name if item.path is not None else f"{spec.name}-{item.number}.png"
                data = item.data if item.data is not None else (lambda image=item.image: _png(image))
                self.station.keep_capture(name, rows, data)
        for record in records:
            for sink in self.sinks:
                sink.put(record)
        return records

    def _next(self, run: SourceRun) -> tuple[Item | None, Trigger | None]:
        """The next item to answer: the newest frame (or next file), or a trigger's frame."""
        if not run.source.spec.trigger:
            return run.source.take(0.5), None
        try:
            trigger = run.triggers.get(timeout=0.5)
        except queue.Empty:
            return None, None
        item = run.source.take(TRIGGER_FRAME_S, after=trigger.time)
        if item is None:
            run.trigger_counts["no_frame"] += 1
            run.source.error = f"no frame arrived within {TRIGGER_FRAME_S:g} s of a trigger"
            trigger.future.set_exception(PetahError(run.source.error))
        return item, trigger

    def _serve(self, run: SourceRun) -> None:
        source, spec = run.source, run.source.spec
        while not self._stop.is_set() and not run.stopping:
            item, trigger = self._next(run)
            if item is None:
                continue
            run.busy = True
            error, records = None, []
            try:
                records = self._answer(run, item, trigger)
            except PetahError as exc:
                error = str(exc).splitlines()[0][:300]
            except Exception as exc:  # noqa: BLE001 - one bad frame or file must not stop the source
                logger.exception("source %s", spec.name)
                error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            source.finish(item, error)
            run.busy = False
            if trigger is not None:
                if error:
                    trigger.future.set_exception(PetahError(error))
                else:
                    trigger.future.set_result(records)
        while run.source.spec.trigger and not run.triggers.empty():  # stopped: nobody waits for ever
            run.triggers.get_nowait().future.set_exception(PetahError(f"source {spec.name} stopped"))

    def in_flight(self) -> int:
        """Sources with an item being answered or one ready to take: the batcher waits (up to
        --max-wait-ms) for their frames to share a batch, as it waits for requests being read."""
        return sum(1 for run in list(self.runs.values())  # a triggered source: only while it answers (its camera
                   if run.busy or (not run.source.spec.trigger and run.source.ready()))  # may be gone)

    def latest(self, name: str) -> dict | None:
        """The newest answered frame of a source as JPEG with its answers (rendered only when asked)."""
        from PIL import Image

        run = self.runs.get(name)
        if run is None or run.last is None:
            return None
        item, answered = run.last
        if item.image is not None:
            picture = Image.fromarray(item.image.transpose(1, 2, 0))
        else:
            picture = Image.open(io.BytesIO(item.data)).convert("RGB")
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=85)
        frame = item.number if item.path is None else item.path.name
        regions = []
        for region, prediction, i in answered:
            one = dataclasses.replace(prediction, results=[prediction.results[i]])
            regions.append({"name": region.name if region else None,
                            "box": list(region.box) if region else [0, 0, picture.width, picture.height],
                            "tasks": self.station.render(one, [Upload(str(frame), b"")])[0]["tasks"]})
        return {"source": name, "frame": frame, "frame_time": round(item.time, 3), "width": picture.width,
                "height": picture.height, "jpeg": base64.b64encode(buffer.getvalue()).decode("ascii"),
                "regions": regions}

    def status(self) -> dict:
        sources = []
        for run in list(self.runs.values()):  # an admin may replace a source meanwhile
            latencies = sorted(run.latency)
            spec = run.source.spec
            extra = {}
            if spec.regions:
                extra["regions"] = [region.to_dict() for region in spec.regions]
            if spec.trigger:
                extra["trigger"] = {"by": "http" if spec.trigger == "http" else mqtt.shown(spec.trigger),
                                    "waiting": run.triggers.qsize(), **run.trigger_counts}
                if run.listener is not None:
                    extra["trigger"]["connected"] = run.listener.connected
                    extra["trigger"]["error"] = None if run.listener.connected else run.listener.why_not()
            sources.append({**run.source.status(), "tasks": list(spec.tasks or []) or "all", **extra,
                            "latency_ms": {"p50": quantile_ms(latencies, 0.5), "p99": quantile_ms(latencies, 0.99)}})
        return {"sources": sources, "sinks": [sink.status() for sink in self.sinks]}

    def stop(self) -> None:
        self._stop.set()
        for run in self.runs.values():
            if run.listener is not None:
                run.listener.close()
            run.source.stop()
        for run in self.runs.values():
            if run.thread is not None:
                run.thread.join(10)
        for sink in self.sinks:
            sink.close()


__all__ = ["Line", "LineConfig"]
