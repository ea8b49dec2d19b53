"""Where a station's results go besides the HTTP answer: the line's MQTT broker, an HTTP hook, a
JSON-lines file (``petah serve --sink …``).

Every result (one per frame or file and task) is a JSON record: source, frame time, task,
version, kind, the answer (no mask or map images: their summaries), and the latency from the frame
to the answer. A sink takes the records its rules let through (``when=TASK:LABEL|LABEL``: only
those tasks, and only answers with one of those labels; ``min-score=S``: drop boxes and answers
scored below S).

Delivery is at least once: a record is appended to the sink's queue on disk
(``STATE/sinks/NAME/queue.jsonl``) before a sender thread delivers it, and the queue's read
position moves on only once the broker (MQTT QoS 1: its PUBACK) or the hook (a 2xx answer) took
it. A sink that is down keeps its queue (up to ``--sink-queue-mb``; past it new records are
dropped and counted) and is retried with backoff; after a crash the records sent but not yet
marked are sent again. A fully delivered queue is emptied. The queue is not synced per record (a
process crash loses nothing; a power cut can lose the last moments).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from petah.errors import PetahError
from petah.files import AppendLog, DiskQueue
from petah.serve import mqtt

logger = logging.getLogger("petah.serve")
SCHEMES = ("mqtt", "mqtts", "http", "https", "jsonl")
BACKOFF_S = (0.5, 1, 2, 5, 10, 30)


@dataclass
class SinkSpec:
    """``URI[,when=TASK:LABEL|LABEL][,when=…][,min-score=S][,name=N]``, from ``--sink``."""

    uri: str
    name: str
    when: dict[str, set[str]] = field(default_factory=dict)  # task -> labels (empty: every answer)
    min_score: float | None = None

    @classmethod
    def parse(cls, text: str, index: int = 0) -> SinkSpec:
        uri, *options = [part.strip() for part in text.split(",")]
        scheme = uri.split(":", 1)[0].lower() if ":" in uri else ""
        if scheme not in SCHEMES:
            raise PetahError(f"--sink {mqtt.shown(uri)!r}: the scheme must be one of "
                             f"{', '.join(s + ':' for s in SCHEMES)}")
        if scheme.startswith("mqtt"):
            mqtt.check_uri(uri, "--sink")
        elif scheme.startswith("http") and not urllib.parse.urlsplit(uri).hostname:
            raise PetahError(f"--sink {mqtt.shown(uri)!r}: names no host")
        if scheme == "jsonl" and not uri[len("jsonl:"):]:
            raise PetahError("--sink jsonl:FILE names no file")
        spec = cls(uri, f"{scheme}-{index}")
        for option in options:
            key, _, value = option.partition("=")
            if key == "when" and ":" in value:
                task, _, labels = value.partition(":")
                spec.when[task] = {label for label in labels.split("|") if label}
            elif key == "when" and value:
                spec.when[value] = set()
            elif key == "min-score":
                try:
                    spec.min_score = float(value)
                except ValueError:
                    raise PetahError(f"--sink {mqtt.shown(uri)!r}: min-score must be a number, got {value!r}") from None
            elif key == "name" and value.replace("-", "").replace("_", "").isalnum():
                spec.name = value
            else:
                raise PetahError(f"--sink {mqtt.shown(uri)!r}: unknown option {option!r} (when=TASK:LABEL|LABEL, "
                                 "min-score=S, name=N)")
        return spec

    @property
    def shown_uri(self) -> str:
        """The URI without a password (for pages, logs and errors)."""
        return mqtt.shown(self.uri)

    def select(self, record: dict) -> dict | None:
        """The record as this sink sends it (boxes under min-score dropped), or None."""
        task, answer = record["task"], record["answer"]
        if self.when and task not in self.when:
            return None
        if self.min_score is not None:
            if "boxes" in answer:
                answer = {**answer, "boxes": [b for b in answer["boxes"] if b.get("score", 0) >= self.min_score]}
                if not answer["boxes"]:
                    return None
            elif isinstance(answer.get("score"), int | float) and answer["score"] < self.min_score:
                return None
        labels = self.when.get(task)
        if labels:
            found = {answer.get("label")} | {b.get("label") for b in answer.get("boxes", [])}
            if not labels & found:
                return None
        return {**record, "answer": answer}


def result_record(source: str, frame_time: float, frame: int | str, task: str, row: dict, latency_s: float,
                  region: str | None = None, trigger: str | None = None) -> dict:
    """One task's answer on one frame (or one region of it), as sinks send it (images left out;
    see the module's doc); ``trigger``: the id of the trigger it answers."""
    answer = {k: v for k, v in row.items()
              if k not in ("mask", "anomaly_map", "mask_png", "anomaly_map_png", "version", "kind")}
    return {"source": source, "frame_time": round(frame_time, 3), "frame": frame, "region": region,
            "trigger": trigger, "task": task, "version": row.get("version"), "kind": row.get("kind"),
            "answer": answer, "latency_ms": round(1000 * latency_s, 2)}


def _plain(value):
    """numpy scalars as Python numbers (an answer may carry float32 scores)."""
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON")


class Delivery:
    """How one kind of sink hands over one record; raises OSError / PetahError when it could not."""

    def send(self, record: bytes, topic_suffix: str) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class HttpDelivery(Delivery):
    def __init__(self, uri: str, timeout: float = 10.0):
        self.uri, self.timeout = uri, timeout

    def send(self, record: bytes, topic_suffix: str) -> None:
        request = urllib.request.Request(self.uri, data=record, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as reply:  # noqa: S310 - the user's URL
                reply.read(1 << 16)
        except urllib.error.HTTPError as exc:
            raise PetahError(f"the hook answered HTTP {exc.code}") from None


class MqttDelivery(Delivery):
    """QoS 1: a record counts as delivered once the broker acknowledged it."""

    def __init__(self, uri: str, ca_file: str | None = None, timeout: float = 10.0):
        self.topic, self.timeout = mqtt.topic(uri), timeout
        self.connection = mqtt.Connection(uri, ca_file)

    def send(self, record: bytes, topic_suffix: str) -> None:
        if not self.connection.connected:
            raise PetahError(self.connection.why_not())
        info = self.connection.client.publish(f"{self.topic}/{topic_suffix}", record, qos=1)
        info.wait_for_publish(self.timeout)
        if not info.is_published():
            raise PetahError(f"the broker did not acknowledge within {self.timeout:g} s")

    def close(self) -> None:
        self.connection.close()


class JsonlDelivery(Delivery):
    def __init__(self, path: str):
        self.log = AppendLog(Path(path), sync=False)

    def send(self, record: bytes, topic_suffix: str) -> None:
        self.log.append(record + b"\n")


class Sink:
    """One ``--sink``: its rules, its queue on disk and the thread that empties it."""

    def __init__(self, spec: SinkSpec, folder: Path, max_queue_bytes: int, mqtt_ca: str | None = None):
        self.spec, self.folder, self.max_queue_bytes = spec, folder, max_queue_bytes
        self.queue = DiskQueue(folder, max_bytes=max_queue_bytes)  # not synced per record (see the module's doc)
        self.counts = {"queued": 0, "delivered": 0, "dropped": 0, "failed_tries": 0, "filtered": 0}
        self.cpu_s = 0.0  # the sender thread's own CPU (delivery measured apart from inference)
        self.state, self.error = "starting", None
        self._wake = threading.Condition()
        self._stop = threading.Event()
        scheme = spec.uri.split(":", 1)[0].lower()
        self.delivery: Delivery = (JsonlDelivery(spec.uri[len("jsonl:"):]) if scheme == "jsonl" else
                                   HttpDelivery(spec.uri) if scheme.startswith("http") else
                                   MqttDelivery(spec.uri, mqtt_ca))
        self._thread = threading.Thread(target=self._run, name=f"petah-sink-{spec.name}", daemon=True)
        self._thread.start()

    @property
    def backlog_bytes(self) -> int:
        return self.queue.backlog_bytes

    def put(self, record: dict) -> None:
        chosen = self.spec.select(record)
        if chosen is None:
            self.counts["filtered"] += 1
            return
        line = json.dumps(chosen, separators=(",", ":"), default=_plain).encode() + b"\n"
        try:
            queued = self.queue.put(line)
        except OSError as exc:
            queued = False
            self.error = f"its queue cannot be written ({exc.strerror or exc})"
        self.counts["queued" if queued else "dropped"] += 1
        if queued:
            with self._wake:
                self._wake.notify()

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            line = self.queue.next()
            if line is None:
                if self.queue.backlog_bytes == 0:
                    self.state = "idle" if self.error is None else self.state
                    with self._wake:
                        self._wake.wait(0.5)
                else:
                    time.sleep(0.01)  # a line being appended
                continue
            record = line.rstrip(b"\n")
            try:
                data = json.loads(record)
                suffix = "/".join(str(data[k]) for k in ("source", "region", "task") if data.get(k) is not None)
            except ValueError:  # a line torn by a crash: skipped
                self.queue.delivered(line)
                continue
            began = time.thread_time()
            try:
                self.delivery.send(record, suffix)
            except Exception as exc:  # noqa: BLE001 - paho raises RuntimeError on a connection lost mid-publish:
                # whatever it is, the record stays queued and the thread goes on
                self.cpu_s += time.thread_time() - began
                failures += 1
                self.counts["failed_tries"] += 1
                self.state, self.error = "retrying", str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
                self._stop.wait(BACKOFF_S[min(failures, len(BACKOFF_S)) - 1])
                continue
            self.cpu_s += time.thread_time() - began
            failures = 0
            self.state, self.error = "delivering", None
            self.counts["delivered"] += 1
            self.queue.delivered(line)

    def status(self) -> dict:
        return {"name": self.spec.name, "uri": self.spec.shown_uri, "state": self.state, "error": self.error,
                "backlog_bytes": self.backlog_bytes, "max_queue_bytes": self.max_queue_bytes,
                "send_cpu_s": round(self.cpu_s, 3), **self.counts}

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        with self._wake:
            self._wake.notify_all()
        self._thread.join(timeout)
        self.delivery.close()
        if not self._thread.is_alive():  # a send still hanging would write its mark into a reused fd
            self.queue.close()


__all__ = ["SCHEMES", "Sink", "SinkSpec", "result_record"]
