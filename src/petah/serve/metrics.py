"""The station's counters: Prometheus text at /metrics (prometheus_client, one registry per
station so two stations in one process never share counts) and the few figures the page shows."""

from __future__ import annotations

import collections
import os
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.process_collector import ProcessCollector

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
RECENT = 2000  # latencies kept for the page's p50 / p99


def resident_bytes() -> int:
    """This process's resident memory (Linux /proc; 0 where it cannot be read)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def quantile_ms(sorted_seconds: list[float], q: float) -> float | None:
    """The q-quantile (nearest rank) of sorted durations, in milliseconds; None when there are none."""
    if not sorted_seconds:
        return None
    return round(1000 * sorted_seconds[min(len(sorted_seconds) - 1, int(q * len(sorted_seconds)))], 3)


class StationMetrics:
    def __init__(self, tasks_loaded, queue_depth, drift=None):
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, cpu seconds, open fds
        r = self.registry
        self.http = Counter("petah_http_requests", "HTTP requests by route and status code", ["route", "code"],
                            registry=r)
        self.task_requests = Counter("petah_task_requests", "Prediction requests per task", ["task"], registry=r)
        self.task_latency = Histogram("petah_task_latency_seconds", "Server-side latency of prediction requests, "
                                      "per task requested", ["task"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("petah_batch_images", "Images per inference batch", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.errors = Counter("petah_errors", "Refused or failed requests by reason", ["reason"], registry=r)
        self.swaps = Counter("petah_swaps", "Task changes by action", ["action"], registry=r)
        self.swap_pause = Histogram("petah_swap_pause_seconds", "Time the inference thread spent on a task change "
                                    "(what requests wait for)", buckets=LATENCY_BUCKETS, registry=r)
        Gauge("petah_tasks_loaded", "Tasks being served", registry=r).set_function(tasks_loaded)
        Gauge("petah_resident_bytes", "Resident memory of the station process", registry=r).set_function(
            resident_bytes)
        Gauge("petah_queue_depth", "Requests waiting for inference", registry=r).set_function(queue_depth)
        if drift is not None:
            r.register(DriftCollector(drift))
        self.started = time.time()
        self._lock = threading.Lock()
        self._recent: collections.deque[float] = collections.deque(maxlen=RECENT)
        self._pauses: collections.deque[float] = collections.deque(maxlen=RECENT)
        self._requests = 0
        self._failed = 0

    def watch_line(self, status) -> None:
        self.registry.register(LineCollector(status))

    def observe_prediction(self, tasks, seconds: float) -> None:
        for task in tasks:
            self.task_requests.labels(task).inc()
            self.task_latency.labels(task).observe(seconds)
        with self._lock:
            self._recent.append(seconds)
            self._requests += 1

    def observe_pause(self, seconds: float) -> None:
        self.swap_pause.observe(seconds)
        with self._lock:
            self._pauses.append(seconds)

    def observe_error(self, reason: str) -> None:
        self.errors.labels(reason).inc()
        with self._lock:
            self._failed += 1

    def summary(self) -> dict:
        """What the page shows: counts and p50 / p99 of the last predictions."""
        with self._lock:
            recent, pauses = sorted(self._recent), sorted(self._pauses)
            requests, failed = self._requests, self._failed
        return {"requests": requests, "errors": failed, "p50_ms": quantile_ms(recent, 0.5),
                "p99_ms": quantile_ms(recent, 0.99), "window": len(recent),
                "swap_pause_p50_ms": quantile_ms(pauses, 0.5), "swap_pause_p99_ms": quantile_ms(pauses, 0.99),
                "swaps": len(pauses), "uptime_s": round(time.time() - self.started, 1),
                "resident_bytes": resident_bytes()}

    def text(self) -> bytes:
        return generate_latest(self.registry)


class DriftCollector:
    """Per task gauges of the drift check (``petah.serve.drift``), read when /metrics is scraped."""

    GAUGES = (("input_drift", "petah_task_input_drift", "Input drift of the task's recent images (reference sds)"),
              ("feature_drift", "petah_task_feature_drift", "Feature drift of the task's recent images (reference "
                                                             "sds, root mean square)"),
              ("estimated", "petah_task_estimated_metric", "The task's metric estimated without labels (points)"),
              ("confidence", "petah_task_confidence", "Mean confidence of the task's recent answers"))

    def __init__(self, summaries):
        self.summaries = summaries

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        summaries = self.summaries()
        for key, name, text in self.GAUGES:
            family = GaugeMetricFamily(name, text, labels=["task"])
            for task, summary in summaries.items():
                if isinstance(summary.get(key), int | float):
                    family.add_metric([task], float(summary[key]))
            yield family
        drifting = GaugeMetricFamily("petah_task_drifting", "1 while the task is called drifting", labels=["task"])
        alarms = GaugeMetricFamily("petah_task_drift_alarms", "Times the task was called drifting", labels=["task"])
        for task, summary in summaries.items():
            drifting.add_metric([task], float(summary.get("state") == "drifting"))
            alarms.add_metric([task], float(summary.get("alarms", 0)))
        yield drifting
        yield alarms


class LineCollector:
    """Per source and per sink counters and states of the line (``petah.serve.line``)."""

    SOURCE_COUNTS = ("decoded", "taken", "dropped", "reconnects", "found", "answered", "failed")
    SINK_COUNTS = ("queued", "delivered", "dropped", "failed_tries", "filtered")
    UP = {"streaming", "watching", "idle", "delivering"}

    def __init__(self, status):
        self.status = status

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        status = self.status()
        frames = CounterMetricFamily("petah_source_items", "Frames or files per source by what became of them",
                                     labels=["source", "outcome"])
        up = GaugeMetricFamily("petah_source_up", "1 while the source streams or its folder is watched",
                               labels=["source"])
        triggers = CounterMetricFamily("petah_source_triggers", "Triggers per source by what became of them",
                                       labels=["source", "outcome"])
        for source in status["sources"]:
            for key in self.SOURCE_COUNTS:
                if key in source:
                    frames.add_metric([source["name"], key], float(source[key]))
            for key in ("triggers", "refused", "no_frame"):
                if "trigger" in source:
                    triggers.add_metric([source["name"], key], float(source["trigger"][key]))
            up.add_metric([source["name"]], float(source["state"] in self.UP))
        records = CounterMetricFamily("petah_sink_records", "Results per sink by what became of them",
                                      labels=["sink", "outcome"])
        backlog = GaugeMetricFamily("petah_sink_backlog_bytes", "Results queued on disk, not yet delivered",
                                    labels=["sink"])
        sink_up = GaugeMetricFamily("petah_sink_up", "1 while the sink delivers (or has nothing to)", labels=["sink"])
        for sink in status["sinks"]:
            for key in self.SINK_COUNTS:
                records.add_metric([sink["name"], key], float(sink[key]))
            backlog.add_metric([sink["name"]], float(sink["backlog_bytes"]))
            sink_up.add_metric([sink["name"]], float(sink["state"] in self.UP))
        yield from (frames, up, triggers, records, backlog, sink_up)


__all__ = ["DriftCollector", "LineCollector", "StationMetrics", "quantile_ms", "resident_bytes"]
