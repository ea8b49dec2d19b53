"""The station: one engine on one inference thread, the installed set in a state folder, counters.

HTTP lives in ``app.py``; this class is what the endpoints call, usable (and tested) without it.
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import logging
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from petah.device.decode import anomaly_map_png, mask_png
from petah.device.session import release_memory
from petah.errors import EngineCannotRun, PetahError, PetahWarning
from petah.imaging import Preprocess, load_image_modes
from petah.packages import Manifest, SignatureError, TrustPolicy, check_task_name, read_manifest
from petah.packages.reference import input_statistics
from petah.serve.capture import CaptureStore
from petah.serve.config import ServeConfig
from petah.serve.drift import DriftMonitor, confidences
from petah.serve.engine import choose_engine, engine_class
from petah.serve.metrics import StationMetrics
from petah.serve.state import (
    BackboneRecord,
    Entry,
    StateDir,
    StateUnwritable,
    backbone_state_root,
    installed_backbone_folder,
    read_active,
    write_active,
)
from petah.serve.worker import BatchWorker, Busy, Job, Upload

logger = logging.getLogger("petah.station")
VERSION_CHARS = 12  # a task's version: this many hex digits of its package's sha256


class UnknownTask(PetahError):
    """A task the station does not serve (HTTP 404)."""


@dataclass
class TaskRecord:
    name: str
    manifest: Manifest
    sha256: str
    bytes: int
    loaded_at: str
    previous: str | None

    @property
    def version(self) -> str:
        return self.sha256[:VERSION_CHARS]

    def to_dict(self, candidate: str | None = None) -> dict:
        """One row of ``GET /v1/tasks`` (a contract: scripts read these keys)."""
        return {"name": self.name, "kind": self.manifest.task.kind, "labels": list(self.manifest.labels),
                "version": self.version, "bytes": self.bytes, "metrics": self.manifest.metrics,
                "loaded_at": self.loaded_at, "previous_version": self.previous and self.previous[:VERSION_CHARS],
                "candidate_version": candidate and candidate[:VERSION_CHARS]}


@dataclass
class Serving:
    """One backbone with its engine, its state folder and the tasks adapted on it."""

    backbone: object
    engine: object
    state: StateDir
    tasks: dict[str, TaskRecord]


@dataclass
class Prediction:
    results: list[dict]  # per image: {task: result}
    tags: dict[str, dict]  # per task: the version and kind that produced its results
    batch_images: int


def header_pixels(data: bytes) -> int:
    """Width x height as an image's header claims it (0 when unreadable: decoding then names it)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                return image.size[0] * image.size[1]
    except Exception:  # hostile bytes: the decoder's own error message comes later
        return 0


def decode_uploads(uploads: list[Upload], modes: tuple[str, ...]) -> dict[str, list]:
    """Each image decoded once, under every intensity mode in ``modes``; a bad file is named."""
    by_mode: dict[str, list] = {m: [] for m in modes}
    for upload in uploads:
        try:
            images = load_image_modes(upload.data, modes, name=upload.name)
        except PetahError:
            raise
        except Exception as exc:  # a decoder's own failure on hostile bytes: still this file's fault
            raise PetahError(f"cannot read image {upload.name}: {type(exc).__name__}") from None
        for mode in modes:
            by_mode[mode].append(images[mode])
    return by_mode


def now_utc() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


class Station:
    def __init__(self, backbone, state_dir: str | Path, config: ServeConfig | None = None,
                 packages: list[Path] = ()):
        """Serve the state folder's set, then install ``packages`` into it (as an admin upload would)."""
        self.config = config or ServeConfig()
        self.home = Path(state_dir)  # the --state-dir: the agent's and the line's files, every backbone's tasks
        backbone = self._recorded_backbone(backbone)
        self.state = StateDir(backbone_state_root(self.home, backbone.fingerprint), backbone.fingerprint)
        self.engine = self.new_engine(backbone, len(self.state.entries) + len(packages))
        self.backbone = self.engine.backbone  # the engine's: the caller's copy can be freed
        self.standby: Serving | None = None  # the backbone a release replaced, kept through its health window
        self.tasks: dict[str, TaskRecord] = {}  # changed only on the inference thread (with the engine)
        self.candidates: dict[str, str] = {}  # task -> sha256 of a release being installed / watched (agent)
        self.drift = DriftMonitor(self.config.drift)
        capture = self.config.capture
        self.capture = CaptureStore(capture.capture_dir, capture) if capture.capture_dir else None
        self.line = None  # the sources and sinks (petah.serve.line.Line), set by the app that serves it
        self.metrics = StationMetrics(lambda: len(self.tasks), lambda: self.worker.depth,
                                      lambda: {name: self.drift.summary(name) for name in list(self.tasks)})
        self.worker = BatchWorker(self._run_batch, max_batch=self.config.max_batch,
                                  max_wait_s=self.config.max_wait_ms / 1000, queue_size=self.config.queue_size,
                                  on_batch=self.metrics.batch_size.observe, on_pause=self.metrics.observe_pause,
                                  in_flight=lambda: self.in_flight + (self.line.in_flight() if self.line else 0))
        self.in_flight = 0  # prediction requests between arrival and answer (the batcher waits for them)
        self._changes = threading.Lock()  # one install / rollback / delete at a time (state + engine together)
        self._restore()
        for path in packages:
            self.install(Path(path).read_bytes())

    def new_engine(self, backbone, tasks: int):
        """An engine of this station's settings for ``backbone`` (``tasks``: how many it will hold)."""
        budget = self.config.memory_budget_mb * 2**20 or None
        engine = choose_engine(self.config.engine, backbone, tasks, budget or float("inf"))
        trust = TrustPolicy.from_options(self.config.trust, self.config.require_signed)
        return engine_class(engine)(backbone, self.config.inference_threads, trust, memory_budget_bytes=budget)

    def _recorded_backbone(self, backbone):
        """The backbone to serve: the one a fleet release installed in place of ``backbone`` where
        the state dir records that (a restart with the old ``-b`` serves the new pair), else
        ``backbone`` (also where it is neither of the recorded two: the operator's choice)."""
        from petah.device import read_device_backbone

        active = read_active(self.home)
        if active is None or backbone.fingerprint == active[0].fingerprint:
            return backbone
        current, previous = active
        if previous is None or backbone.fingerprint != previous.fingerprint:
            return backbone
        if current.folder is None:
            raise PetahError(f"state dir {self.home}: a release replaced this backbone by "
                             f"{current.fingerprint[:16]}…, whose folder it does not record")
        loaded = read_device_backbone(current.folder, current.weights)
        if loaded.fingerprint != current.fingerprint:
            raise PetahError(f"state dir {self.home}: the backbone folder it records is not "
                             f"{current.fingerprint[:16]}…")
        warnings.warn(f"serving {loaded.describe()}, which a fleet release installed in place of "
                      f"{backbone.fingerprint[:12]} (state dir {self.home})", PetahWarning, stacklevel=3)
        return loaded

    # --- life cycle --------------------------------------------------------------------------
    def _restore(self) -> None:
        """Serve the state folder's set; a package that no longer loads falls back to its previous
        version, else is dropped (with a warning: the rest of the station still starts)."""
        entries = dict(self.state.entries)
        for name, entry in list(entries.items()):
            for sha in (entry.sha256, entry.previous):
                if sha is None:
                    continue
                try:
                    self._swap_in(name, sha, entry.loaded_at, entry.previous if sha == entry.sha256 else None)
                    entries[name] = Entry(sha, entry.previous if sha == entry.sha256 else None, entry.loaded_at)
                    break
                except SignatureError as exc:  # a trust setting, not a broken file: change nothing on disk
                    raise SignatureError(f"state dir {self.state.root}: task {name} is refused by --trust / "
                                         f"--require-signed ({exc}); start with the keys it was signed with, or "
                                         "with another --state-dir") from None
                except EngineCannotRun as exc:  # a valid package this install cannot run: kept on disk, not served
                    warnings.warn(f"state dir: task {name} is kept but not served here: {exc}", PetahWarning,
                                  stacklevel=2)
                    break
                except Exception as exc:  # whatever one stored package does, the rest of the station starts
                    warnings.warn(f"state dir: task {name} version {sha[:VERSION_CHARS]} does not load: {exc}",
                                  PetahWarning, stacklevel=2)
            else:
                del entries[name]
        if entries != self.state.entries:
            try:
                self.state.commit(entries)
            except StateUnwritable as exc:  # serve what loads; the file keeps the old set until it can be written
                warnings.warn(f"state dir {self.state.root}: {exc}", PetahWarning, stacklevel=2)

    def start(self) -> None:
        self.worker.start()

    def stop(self) -> None:
        self.worker.stop()

    # --- changing the set --------------------------------------------------------------------
    def _swap_in(self, name: str, sha: str, loaded_at: str, previous: str | None,
                 durable: dict[str, Entry] | None = None) -> TaskRecord:
        """Load a stored package as task ``name``: prepared here, beside inference; then, with
        ``durable``, that set written to the state dir (so a crash from here on restarts with the
        new version); then swapped in on the inference thread between two batches (directly while
        that thread has not started). A failed swap writes the old set back."""
        path = self.state.package_path(sha)
        if not path.is_file():
            raise PetahError(f"package {sha[:VERSION_CHARS]} is missing from the state dir")
        prepared = self.engine.prepare(path, name)  # read + verify + head (+ adapters on a shadow)
        before = dict(self.state.entries)
        if durable is not None:
            self.state.commit(durable)

        def swap() -> TaskRecord:
            manifest = self.engine.install(prepared)
            record = TaskRecord(name, manifest, sha, path.stat().st_size, loaded_at, previous)
            self.tasks[name] = record
            self.drift.watch(name, manifest)  # a new version's window starts afresh
            return record

        try:
            record = self.worker.call(swap).result() if self.worker.alive else swap()
        except BaseException:
            if durable is not None:
                self.state.commit(before)
            raise
        try:  # cleaning up is a pause of its own (batches run in between); waited for, so the next
            # change is prepared against the model as it will be
            self.worker.call(self.engine.retire).result() if self.worker.alive else self.engine.retire()
        except Exception as exc:  # the new version serves; a failed clean-up only costs memory
            warnings.warn(f"removing the replaced version of {name} failed: {exc}", PetahWarning, stacklevel=2)
        release_memory()
        return record

    def install(self, data: bytes, name: str | None = None) -> TaskRecord:
        """Verify a package, load it next to the serving set and swap it in between two batches; the
        version it replaces stays on disk for ``rollback``. Any failure leaves the old set serving."""
        if name is not None:
            check_task_name(name, "the task name in the request")  # the caller's input, not the package's
        with self._changes:
            sha, path = self.state.store(data)
            try:
                own = read_manifest(path).task.name  # checked as a task name by prepare
                if name and name != own and self.config.require_signed:
                    raise SignatureError(f"the package is signed as task {own!r}: --require-signed serves it only "
                                         "under that name")
                name = name or own
                old = self.state.entries.get(name)
                previous = old.sha256 if old and old.sha256 != sha else (old.previous if old else None)
                loaded_at = now_utc()
                record = self._swap_in(name, sha, loaded_at, previous,
                                       {**self.state.entries, name: Entry(sha, previous, loaded_at)})
            except PetahError as exc:
                self._forget(sha, path)
                raise self._as_upload_error(exc, path, name) from None
            except BaseException:
                self._forget(sha, path)
                raise
            self.metrics.swaps.labels("install").inc()
            return record

    def _forget(self, sha: str, path: Path) -> None:
        """Remove a refused upload's stored file, unless a task (or its rollback) refers to it."""
        if sha not in self._referenced():
            try:
                path.unlink(missing_ok=True)
            except OSError:  # a read-only state dir: the start-up sweep removes it later
                pass

    def _as_upload_error(self, exc: PetahError, path: Path, name: str | None) -> PetahError:
        """The same error naming the upload instead of the file it was stored as (a client must not
        learn server paths); the log keeps the original."""
        message = str(exc)
        if str(path) in message:
            logger.warning("refused upload for task %s: %s", name, message)
            message = message.replace(f"package {path}", "the uploaded package").replace(str(path),
                                                                                     "the uploaded package")
        return type(exc)(message)

    def rollback(self, name: str) -> TaskRecord:
        """Serve the task's previous version again (the current one becomes its previous)."""
        with self._changes:
            entry = self._entry(name)
            if entry.previous is None:
                raise PetahError(f"task {name} has no previous version to roll back to")
            loaded_at = now_utc()
            record = self._swap_in(name, entry.previous, loaded_at, entry.sha256,
                                   {**self.state.entries, name: Entry(entry.previous, entry.sha256, loaded_at)})
            self.metrics.swaps.labels("rollback").inc()
            return record

    def delete(self, name: str) -> None:
        """Stop serving a task: the smaller set is written first, so a state dir that cannot be
        written refuses the delete before the task leaves memory (and a restart agrees)."""
        with self._changes:
            self._entry(name)
            before = dict(self.state.entries)
            self.state.commit({k: v for k, v in before.items() if k != name})

            def unload() -> None:
                self.engine.unload(name)
                del self.tasks[name]
                self.drift.forget(name)

            try:
                self.worker.call(unload).result() if self.worker.alive else unload()
            except BaseException:
                self.state.commit(before)
                raise
            release_memory()
            self.metrics.swaps.labels("delete").inc()

    # --- changing the backbone (a fleet release: a new backbone and every task adapted on it) ------
    def change_backbone(self, backbone, packages: dict[str, bytes], engine=None) -> None:
        """Serve ``packages`` (task name -> package bytes, each adapted on ``backbone``) on
        ``backbone`` in place of the current pair, swapped between two batches; the current pair
        stays in memory as ``standby`` (``return_backbone``) until ``drop_standby``. The new
        pair's state is complete on disk before ``active-backbone.json`` names it, so a crash
        leaves the old pair or the new one."""
        with self._changes:
            state = StateDir(self.home / "backbones" / backbone.fingerprint, backbone.fingerprint)
            engine = engine or self.new_engine(backbone, len(packages))
            loaded_at, tasks, entries = now_utc(), {}, {}
            for name, data in packages.items():
                sha, path = state.store(data)
                manifest = engine.install(engine.prepare(path, name))
                tasks[name] = TaskRecord(name, manifest, sha, len(data), loaded_at, None)
                entries[name] = Entry(sha, None, loaded_at)
            state.commit(entries)
            leaving = Serving(self.backbone, self.engine, self.state, dict(self.tasks))
            self._activate(Serving(engine.backbone, engine, state, tasks), leaving)
            self.standby = leaving
            self.metrics.swaps.labels("backbone").inc()

    def return_backbone(self) -> None:
        """Serve the previous backbone and its tasks again (the standby pair, or loaded from the
        recorded folder once it was freed); the pair left is dropped."""
        with self._changes:
            active = read_active(self.home)
            if active is None or active[1] is None:
                raise PetahError("this station has no previous backbone to return to")
            previous = active[1]
            serving = self.standby if self.standby and self.standby.backbone.fingerprint == previous.fingerprint \
                else self._load_serving(previous)
            self._activate(serving, Serving(self.backbone, self.engine, self.state, dict(self.tasks)))
            self.standby = None
            release_memory()
            self.metrics.swaps.labels("backbone").inc()

    def drop_standby(self) -> None:
        """Free the replaced backbone (its files stay: a later return loads them again)."""
        self.standby = None
        release_memory()

    def _load_serving(self, record: BackboneRecord) -> Serving:
        from petah.device import read_device_backbone

        if record.folder is None:
            raise PetahError(f"backbone {record.fingerprint[:16]}… was not loaded from a folder: it cannot be loaded "
                             "again")
        backbone = read_device_backbone(record.folder, record.weights)
        if backbone.fingerprint != record.fingerprint:
            raise PetahError(f"the backbone folder recorded for {record.fingerprint[:16]}… holds another backbone")
        state = StateDir(backbone_state_root(self.home, backbone.fingerprint), backbone.fingerprint)
        engine = self.new_engine(backbone, len(state.entries))
        tasks = {}
        for name, entry in state.entries.items():
            path = state.package_path(entry.sha256)
            manifest = engine.install(engine.prepare(path, name))
            tasks[name] = TaskRecord(name, manifest, entry.sha256, path.stat().st_size, entry.loaded_at, entry.previous)
        return Serving(engine.backbone, engine, state, tasks)

    def _activate(self, serving: Serving, leaving: Serving) -> None:
        """Record ``serving`` as the current backbone (``leaving`` as the previous), then swap it in
        on the inference thread; a failed swap writes the record back."""
        before = read_active(self.home)
        write_active(self.home, BackboneRecord.of(serving.backbone), BackboneRecord.of(leaving.backbone))

        def swap() -> None:
            self.backbone, self.engine, self.state, self.tasks = (serving.backbone, serving.engine, serving.state,
                                                                   dict(serving.tasks))
            for name in set(leaving.tasks) - set(serving.tasks):
                self.drift.forget(name)
            for name, record in serving.tasks.items():
                self.drift.watch(name, record.manifest)

        try:
            self.worker.call(swap).result() if self.worker.alive else swap()
        except BaseException:
            if before is None:
                (self.home / "active-backbone.json").unlink(missing_ok=True)
            else:
                write_active(self.home, *before)
            raise

    def installed_backbone_folder(self, fingerprint: str) -> Path:
        return installed_backbone_folder(self.home, fingerprint)

    def client_message(self, message: str) -> str:
        """An error message fit for a client: the station's own folders named by role, not path (the
        last line of defence: errors are meant to name the request's inputs already)."""
        folders = [(self.home, "the state dir"), (self.config.trust, "the --trust folder"),
                   (self.config.golden, "the --golden folder")]
        spelled = [(str(form), role) for folder, role in folders if folder
                   for form in {Path(folder), Path(folder).resolve()}]
        for path, role in sorted(spelled, key=lambda item: -len(item[0])):
            message = message.replace(path, role)
        return message

    def _entry(self, name: str) -> Entry:
        if name not in self.state.entries:
            raise UnknownTask(f"no task {name!r} is served (served: {', '.join(sorted(self.tasks)) or 'none'})")
        return self.state.entries[name]

    def _referenced(self) -> set[str]:
        return {s for e in self.state.entries.values() for s in (e.sha256, e.previous) if s}

    # --- predictions ---------------------------------------------------------------------------
    def check_tasks(self, names: list[str] | None) -> tuple[str, ...]:
        served = dict(self.tasks)
        if names is None:
            if not served:
                raise UnknownTask("the station serves no task yet (install one: PUT /v1/tasks/NAME)")
            return tuple(served)
        if not names:
            raise PetahError("tasks= names no task (leave it out for every task)")
        unknown = [n for n in names if n not in served]
        if unknown:
            raise UnknownTask(f"no task {unknown[0]!r} is served (served: {', '.join(sorted(served)) or 'none'})")
        return tuple(dict.fromkeys(names))

    def decode(self, uploads: list[Upload], tasks: tuple[str, ...], modes: tuple[str, ...] | None = None) -> Job:
        """Each image decoded once per intensity mode its tasks were trained with (off the worker),
        or under ``modes``."""
        self._check_pixels(uploads)
        served = dict(self.tasks)  # a delete may land meanwhile: the batch then reports the task removed
        modes = modes or tuple(dict.fromkeys(served[t].manifest.intensity for t in tasks if t in served))
        return Job(decode_uploads(uploads, modes), tasks, len(uploads), uploads)

    def _check_pixels(self, uploads: list[Upload]) -> None:
        """A few small, highly compressed files can hold gigapixels: refuse by their headers."""
        limit = self.config.max_request_mp * 1e6
        total = sum(header_pixels(upload.data) for upload in uploads)
        if total > limit:
            raise PetahError(f"the images of this request hold {total / 1e6:.1f} MP together; the station takes at "
                             f"most {self.config.max_request_mp:g} MP per request (--max-request-mp)")

    def submit(self, job: Job) -> Future:
        return self.worker.submit(job)

    def _run_batch(self, jobs: list[Job]) -> None:
        """On the inference thread: jobs asking for the same tasks run as one batch per intensity mode."""
        groups: dict[tuple[str, ...], list[Job]] = {}
        for job in jobs:
            groups.setdefault(job.tasks, []).append(job)
        for tasks, group in groups.items():
            missing = [t for t in tasks if t not in self.tasks]
            if missing:  # deleted while the request waited
                for job in group:
                    if job.future.set_running_or_notify_cancel():
                        job.future.set_exception(UnknownTask(f"task {missing[0]!r} was removed"))
                continue
            per_job: list[list[dict]] = [[{} for _ in range(job.count)] for job in group]
            by_mode: dict[str, list[str]] = {}
            for name in tasks:
                by_mode.setdefault(self.tasks[name].manifest.intensity, []).append(name)
            for mode, names in by_mode.items():
                for job in group:
                    if mode not in job.images:  # a swap changed the task's intensity mode after decoding
                        job.images.update(decode_uploads(job.sources, (mode,)))
                images = [image for job in group for image in job.images[mode]]
                outputs = self.engine.run(images, names, self.config.top_k)
                if self.drift.enabled:
                    self._watch(images, outputs)
                for name, rows in outputs.items():
                    offset = 0
                    for j, job in enumerate(group):
                        for i in range(job.count):
                            per_job[j][i][name] = rows[offset + i]
                        offset += job.count
            tags = {t: {"version": self.tasks[t].version, "kind": self.tasks[t].manifest.task.kind} for t in tasks}
            total = sum(job.count for job in group)
            for job, results in zip(group, per_job, strict=True):
                if job.future.set_running_or_notify_cancel():  # False: the client went away meanwhile
                    job.future.set_result(Prediction(results, tags, total))

    def _watch(self, images: list, outputs: dict[str, list[dict]]) -> None:
        """Give the drift check what this batch showed: per task, its images' statistics as its
        model saw them, its answers' confidences, and its features where the engine gives them."""
        statistics: dict = {}  # tasks of one backbone share their preprocessing: computed once
        features = getattr(self.engine, "features", {})
        inputs = getattr(self.engine, "inputs", {})  # the engine's own preprocessed batch: not resized again
        for name, rows in outputs.items():
            manifest = self.tasks[name].manifest
            preprocess = Preprocess.from_dict(manifest.preprocessing)
            if preprocess not in statistics:
                batch = inputs[preprocess] if preprocess in inputs else preprocess.array_batch(images)
                statistics[preprocess] = input_statistics(batch, preprocess.mean, preprocess.std)
            self.drift.observe(name, statistics[preprocess], confidences(manifest.task.kind, rows),
                               features.get(name))

    @staticmethod
    def render(prediction: Prediction, uploads: list[Upload]) -> list[dict]:
        """JSON-ready results: each task's result tagged with its version; masks as PNG (base64)."""
        images = []
        for upload, result in zip(uploads, prediction.results, strict=True):
            tasks = {}
            for name, row in result.items():
                row = {**prediction.tags[name], **row}
                if "mask" in row:
                    mask = row.pop("mask")
                    row["mask_png"] = base64.b64encode(mask_png(np.asarray(mask))).decode("ascii")
                    row["mask_size"] = [int(mask.shape[1]), int(mask.shape[0])]
                if "anomaly_map" in row:  # grey: 128 at the threshold (petah.tasks.anomaly.anomaly_map_image)
                    anomaly_map = np.asarray(row.pop("anomaly_map"))
                    row["anomaly_map_png"] = base64.b64encode(anomaly_map_png(anomaly_map, row["threshold"])
                                                              ).decode("ascii")
                    row["map_size"] = [int(anomaly_map.shape[1]), int(anomaly_map.shape[0])]
                tasks[name] = row
            images.append({"name": upload.name, "tasks": tasks})
        return images

    def keep_captures(self, uploads: list[Upload], images: list[dict]) -> list[str | None]:
        """After answering (on a request thread): keep the images the capture strategies want."""
        if self.capture is None:
            return []
        return [self.keep_capture(upload.name, image["tasks"], upload.data)
                for upload, image in zip(uploads, images, strict=True)]

    def keep_capture(self, name: str, rows: dict[str, dict], data: bytes | Callable[[], bytes]) -> str | None:
        """Keep one answered image when a capture strategy wants it; ``data`` may be a function
        giving its bytes (a line's frame is encoded only then). Its capture id, or None."""
        if self.capture is None:
            return None
        manifests = {task: self.tasks[task].manifest for task in rows if task in self.tasks}
        rows = {task: row for task, row in rows.items() if task in manifests}  # a task deleted meanwhile: left out
        drifting = {task for task in rows if self.drift.summary(task).get("state") == "drifting"}
        why = self.capture.reasons(rows, manifests, drifting)
        if not why:
            return None
        return self.capture.keep(name, data() if callable(data) else data, rows, manifests, drifting, why=why)

    def task_list(self) -> list[dict]:
        return [{**record.to_dict(self.candidates.get(name)), "held": self.engine.held(name),
                 "drift": self.drift.summary(name)} for name, record in sorted(self.tasks.items())]

    def predict_now(self, images: list[tuple[str, bytes]], tasks: tuple[str, ...]) -> list[dict]:
        """Results for image files through the request path (decode, queue, batch), from Python."""
        uploads = [Upload(name, data) for name, data in images]
        return self.answer(self.decode(uploads, self.check_tasks(list(tasks)))).results

    def answer(self, job: Job) -> Prediction:
        """A job's prediction from the worker, from Python (not a request): a full queue is a busy
        station, not a broken task, so it waits for room (at most 10 s)."""
        for _ in range(100):
            try:
                return self.submit(job).result(timeout=120)
            except Busy:
                time.sleep(0.1)
        raise Busy("the station's queue stayed full for 10 s")


__all__ = ["Prediction", "Serving", "Station", "TaskRecord", "UnknownTask", "Upload"]
