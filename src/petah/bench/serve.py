"""``petah bench serve``: the station measured as a client sees it, every figure from one run.

Real station processes (``petah serve`` on 127.0.0.1) with the demo backbone and its four
classification / dense demo packages (every engine serves the same four); clients are threads of
this process, each with its own keep-alive connection, sending one image per request for every
task. Measured per engine: seconds from start to the first answer and resident memory then;
requests/s and p50 / p99 latency at 1 / 4 / 16 concurrent clients with batching on
(``--max-batch 16``) and off (``--max-batch 1``); the pause the inference thread spends on a swap
(p50 / p99 over flips between two versions of a task, under load); resident memory with 1 / 4 / 8
tasks loaded. ``device`` runs on a device backbone folder (``petah export --device``), with
``device_python`` in another environment (a device install, no torch): its installed size is
reported beside this one's. The clients share the CPU with the server, as a line PC's camera
software would: the absolute figures are for that setting, the ratios are what to compare.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from petah.backbones import demo_backbone_path
from petah.device.bundle import WEIGHTS_FILE
from petah.errors import PetahError
from petah.serve import demo_device_files, demo_packages
from petah.serve.client import StationClient, station_process
from petah.serve.metrics import quantile_ms

ADMIN_TOKEN = "bench-admin-token-0123456789abcdef"
TASKS = ("digits", "textures", "defects", "digit-boxes")  # what every engine serves (the anomaly bank: not on devices)
BATCHING = {"on": ("--max-batch", "16", "--max-wait-ms", "5"), "off": ("--max-batch", "1", "--max-wait-ms", "0")}


def bench_images(count: int = 8, size: int = 64) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(0)
    images = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
        images.append(buffer.getvalue())
    return images


def drive(url: str, clients: int, seconds: float, images: list[bytes],
          tasks: list[str] | Callable[[int, int], list[str]] | None = None,
          stop: threading.Event | None = None) -> dict:
    """``clients`` threads sending requests back to back for ``seconds`` (or until ``stop``):
    throughput and latency. ``tasks``: the tasks of every request, or a function of (client,
    request number) giving them."""
    stop = stop or threading.Event()
    latencies: list[list[float]] = [[] for _ in range(clients)]
    failures = [0] * clients
    start_line = threading.Barrier(clients + 1, timeout=120)  # a client that cannot connect breaks it
    stop_at: list[float] = []

    def client(i: int) -> None:
        own = StationClient(url)
        own.request("GET", "/healthz")  # connect before the clock starts
        start_line.wait()
        k = i
        while time.perf_counter() < stop_at[0] and not stop.is_set():
            began = time.perf_counter()
            reply = own.predict([(f"{k}.png", images[k % len(images)])], tasks(i, k) if callable(tasks) else tasks)
            if reply.status == 200:
                latencies[i].append(time.perf_counter() - began)
            else:
                failures[i] += 1
            k += 1
        own.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    stop_at.append(time.perf_counter() + seconds)
    began = time.perf_counter()
    start_line.wait()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    done = sorted(x for row in latencies for x in row)
    return {"clients": clients, "requests": len(done), "failed": sum(failures),
            "requests_per_s": round(len(done) / elapsed, 2),
            "p50_ms": quantile_ms(done, 0.5), "p99_ms": quantile_ms(done, 0.99)}


class Setup:
    """How each engine's station starts: backbone argument, interpreter, the four packages."""

    def __init__(self, root: Path, device_python: str | None):
        self.python = {"device": device_python}
        self.packages = [p for p in demo_packages() if p.stem in TASKS]
        source, weights = demo_device_files()
        folder = root / "device-backbone"  # the demo's device folder with the demo weights beside it
        shutil.copytree(source, folder)
        shutil.copy(weights, folder / WEIGHTS_FILE)
        self.backbone = {"device": str(folder)}

    def args(self, engine: str, state: Path, threads: int, *extra: str, packages: bool = True) -> tuple[str, ...]:
        backbone = self.backbone.get(engine, str(demo_backbone_path()))
        files = [arg for p in self.packages for arg in ("--package", str(p))] if packages else []
        return ("-b", backbone, *files, "--state-dir", str(state), "--engine", engine, "--threads", str(threads),
                *extra)


def measure_start(engine: str, setup: Setup, state: Path, threads: int, images: list[bytes]) -> dict:
    """Seconds from starting the process to the first answer (all four tasks), and resident memory then."""
    began = time.perf_counter()
    with station_process(*setup.args(engine, state, threads), python=setup.python.get(engine)) as (_proc, url):
        client = StationClient(url)
        reply = client.predict([("first.png", images[0])], list(TASKS))
        first = time.perf_counter() - began
        if reply.status != 200:
            raise PetahError(f"bench serve: the {engine} station's first answer failed: {reply.body[:200]!r}")
        stats = client.request("GET", "/v1/stats").json()
    return {"engine": engine, "seconds_to_first_answer": round(first, 2), "resident_bytes": stats["resident_bytes"]}


def measure_throughput(engine: str, setup: Setup, batching: str, clients: tuple[int, ...], seconds: float,
                       state: Path, images: list[bytes], threads: int) -> list[dict]:
    with station_process(*setup.args(engine, state, threads, *BATCHING[batching]),
                         python=setup.python.get(engine)) as (_proc, url):
        drive(url, 1, min(1.0, seconds), images, list(TASKS))  # warm-up
        return [{"engine": engine, "batching": batching, **drive(url, n, seconds, images, list(TASKS))}
                for n in clients]


def measure_swaps(engine: str, setup: Setup, state: Path, swaps: int, images: list[bytes], threads: int,
                  token_file: Path) -> dict:
    """Flip a task between two versions ``swaps`` times while 4 clients keep predicting: the
    inference thread's pauses (each swap, and the clean-up after it: what a request can wait for)
    and the requests' latencies, beside the same load without swaps (preparing a version beside
    inference takes CPU from it: requests slow down, none stops)."""
    packages = {p.stem: p.read_bytes() for p in demo_packages()}
    with station_process(*setup.args(engine, state, threads, "--admin-token-file", str(token_file)),
                         python=setup.python.get(engine)) as (_proc, url):
        admin = StationClient(url)
        for package in (packages["textures"], packages["digits"]):  # two versions of task "flip"
            admin.install("flip", package, ADMIN_TOKEN)
        baseline = drive(url, 4, 3.0, images, ["flip"])  # the same load without swaps
        results: dict = {}
        stop = threading.Event()
        load = threading.Thread(target=lambda: results.update(drive(url, 4, 600, images, ["flip"], stop)))
        load.start()
        time.sleep(0.5)
        for _ in range(swaps):
            if admin.rollback("flip", ADMIN_TOKEN).status != 200:
                raise PetahError("bench serve: a swap failed")
        stop.set()
        load.join()
        stats = admin.request("GET", "/v1/stats").json()
    return {"engine": engine, "swaps": stats["swaps"], "pause_p50_ms": stats["swap_pause_p50_ms"],
            "pause_p99_ms": stats["swap_pause_p99_ms"], "requests_during": results.get("requests"),
            "failed_during": results.get("failed"), "latency_p50_ms_during": results.get("p50_ms"),
            "latency_p99_ms_during": results.get("p99_ms"), "latency_p50_ms_without": baseline["p50_ms"],
            "latency_p99_ms_without": baseline["p99_ms"]}


def measure_memory(engine: str, setup: Setup, state: Path, threads: int, token_file: Path,
                   images: list[bytes]) -> dict:
    """Resident bytes with 1, 4 and 8 tasks (the four demo packages under two names each)."""
    packages = [(p.stem, p.read_bytes()) for p in setup.packages]
    plan = [(f"{stem}-{copy}", data) for copy in (1, 2) for stem, data in packages]
    rows = {}
    with station_process(*setup.args(engine, state, threads, "--admin-token-file", str(token_file), packages=False),
                         python=setup.python.get(engine)) as (_proc, url):
        client = StationClient(url)
        installed = 0
        for count in (1, 4, 8):
            while installed < count:
                name, data = plan[installed]
                if client.install(name, data, ADMIN_TOKEN).status != 200:
                    raise PetahError(f"bench serve: installing {name} failed")
                installed += 1
            for image in images[:4]:  # first inference allocates the working buffers
                client.predict([("m.png", image)])
            time.sleep(0.3)
            rows[count] = {"resident_bytes": client.request("GET", "/v1/stats").json()["resident_bytes"],
                           "package_bytes": sum(len(d) for _, d in plan[:count])}
    added = (rows[8]["resident_bytes"] - rows[1]["resident_bytes"]) / 7
    per_package = (rows[8]["package_bytes"] - rows[1]["package_bytes"]) / 7
    return {"engine": engine, "tasks": {str(k): v for k, v in rows.items()},
            "bytes_per_added_task": round(added), "package_bytes_per_added_task": round(per_package),
            "ratio_to_package_bytes": round(added / per_package, 2)}


def zipf_tasks(names: list[str], exponent: float = 1.0, draws: int = 4096) -> Callable[[int, int], list[str]]:
    """One task per request, the k-th name drawn with probability ∝ 1/k^exponent (a seeded sequence:
    every run and every configuration sees the same requests)."""
    weights = 1.0 / np.arange(1, len(names) + 1) ** exponent
    sequence = np.random.default_rng(0).choice(len(names), size=draws, p=weights / weights.sum())
    return lambda client, k: [names[sequence[(client * 977 + k) % draws]]]


def measure_holding(setup: Setup, root: Path, threads: int, token_file: Path, images: list[bytes], seconds: float,
                    clients: int = 4, merged_copies: int = 3) -> dict:
    """The device engine with 8 tasks (the four demo packages under two names each) and one task per
    request drawn Zipf-like: all held merged (a budget they fit) against a budget of the shared base
    plus ``merged_copies`` merged tasks (the busiest are merged, the rest held on the base). Each
    station is warmed with the same traffic first, so its choice of merged tasks settles."""
    packages = [(p.stem, p.read_bytes()) for p in setup.packages]
    plan = [(f"{stem}-{copy}", data) for copy in (1, 2) for stem, data in packages]
    names = [name for name, _ in plan]
    traffic = zipf_tasks(names)
    rows = []

    def run(label: str, budget_mb: float) -> dict:
        state = root / f"hold-{label}"
        args = setup.args("device", state, threads, "--admin-token-file", str(token_file), "--memory-budget-mb",
                          f"{budget_mb:.2f}", packages=False)
        with station_process(*args, python=setup.python.get("device")) as (_proc, url):
            client = StationClient(url)
            for name, data in plan:
                if client.install(name, data, ADMIN_TOKEN).status != 200:
                    raise PetahError(f"bench serve: installing {name} failed")
            drive(url, clients, max(3.0, seconds), images, traffic)  # warm-up: merges follow the traffic
            measured = drive(url, clients, seconds, images, traffic)
            stats = client.request("GET", "/v1/stats").json()
            forms = [t["held"]["form"] for t in client.tasks()]
        return {"held": label, "budget_mb": round(budget_mb, 2), **measured, "memory": stats["memory"],
                "resident_bytes": stats["resident_bytes"], "merged_tasks": forms.count("merged"),
                "base_tasks": forms.count("shared base")}

    rows.append(run("all merged", 4096.0))
    memory = rows[0]["memory"]
    own = memory["merged_bytes"] / len(plan)  # one merged task's graph
    budget = (memory["backbone_bytes"] + merged_copies * own + memory["adapter_bytes"]) * 1.01 / 2**20
    rows.append(run(f"base + {merged_copies} merged", budget))
    return {"tasks": names, "clients": clients, "zipf_exponent": 1.0, "rows": rows,
            "requests_per_s_ratio": round(rows[1]["requests_per_s"] / rows[0]["requests_per_s"], 2)
            if rows[0]["requests_per_s"] else None,
            "resident_bytes_ratio": round(rows[1]["resident_bytes"] / rows[0]["resident_bytes"], 2)}


def installed_bytes(python: str) -> dict:
    """The environment of ``python``: its site-packages' size (what ``du`` counts) and whether it has torch."""
    code = ("import importlib.util, sysconfig; print(sysconfig.get_paths()['purelib']); "
            "print(importlib.util.find_spec('torch') is not None)")
    lines = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True, timeout=60).stdout.split()
    total = 0
    for folder, _dirs, files in os.walk(lines[0]):
        total += sum(os.lstat(os.path.join(folder, name)).st_blocks * 512 for name in files)
    return {"python": python, "site_packages_bytes": total, "has_torch": lines[1] == "True"}


def run_serve_bench(engines: tuple[str, ...] = ("device", "onnx", "torch"), clients: tuple[int, ...] = (1, 4, 16),
                    seconds: float = 4.0, swaps: int = 40, threads: int = 2, device_python: str | None = None) -> dict:
    images = bench_images()
    with tempfile.TemporaryDirectory(prefix="petah-bench-serve-") as tmp:
        root = Path(tmp)
        setup = Setup(root, device_python)
        token_file = root / "admin-token"
        token_file.write_text(ADMIN_TOKEN)
        start = [measure_start(e, setup, root / f"start-{e}", threads, images) for e in engines]
        throughput = []
        for engine in engines:
            for batching in ("on", "off"):
                throughput += measure_throughput(engine, setup, batching, clients, seconds,
                                                 root / f"t-{engine}-{batching}", images, threads)
        swap_rows = [measure_swaps(e, setup, root / f"s-{e}", swaps, images, threads, token_file) for e in engines]
        memory = [measure_memory(e, setup, root / f"m-{e}", threads, token_file, images) for e in engines]
        holding = measure_holding(setup, root, threads, token_file, images, seconds) if "device" in engines else None
    installs = {"this": installed_bytes(sys.executable)}
    if device_python:
        installs["device"] = installed_bytes(device_python)
    return {"tasks": list(TASKS), "threads": threads, "seconds_per_point": seconds, "installs": installs,
            "start": start, "throughput": throughput, "swaps": swap_rows, "memory": memory, "holding": holding,
            "ratios": {**ratios(throughput, swap_rows, memory, clients, start),
                       **({"device, Zipf over 8 tasks: base + 3 merged / all merged requests/s":
                           holding["requests_per_s_ratio"]} if holding else {})}}


def ratios(throughput: list[dict], swaps: list[dict], memory: list[dict], clients: tuple[int, ...],
           start: list[dict]) -> dict:
    """The issue's targets as measured ratios (one run)."""
    rps = {(r["engine"], r["batching"], r["clients"]): r["requests_per_s"] for r in throughput}
    engines = sorted({r["engine"] for r in throughput})
    out = {}
    lo, hi = min(clients), max(clients)

    def ratio(a, b):
        return round(rps[a] / rps[b], 2) if rps[b] else None  # a point where nothing was answered

    for engine in engines:
        out[f"{engine}: {hi} clients batched / {lo} client"] = ratio((engine, "on", hi), (engine, "on", lo))
        out[f"{engine}: {hi} clients batched / unbatched"] = ratio((engine, "on", hi), (engine, "off", hi))
    if set(engines) >= {"torch", "onnx"}:
        out[f"onnx / torch requests/s at {lo} client"] = ratio(("onnx", "on", lo), ("torch", "on", lo))
        out[f"onnx / torch requests/s at {hi} clients"] = ratio(("onnx", "on", hi), ("torch", "on", hi))
    if set(engines) >= {"device", "onnx"}:
        for n in clients:
            out[f"device / onnx requests/s at {n} clients"] = ratio(("device", "on", n), ("onnx", "on", n))
    by_engine = {row["engine"]: row for row in start}
    if {"device", "torch"} <= set(by_engine):
        out["device / torch resident bytes at start"] = round(by_engine["device"]["resident_bytes"]
                                                              / by_engine["torch"]["resident_bytes"], 2)
    for row in memory:
        out[f"{row['engine']}: resident bytes per added task / its package bytes"] = row["ratio_to_package_bytes"]
    for row in swaps:
        out[f"{row['engine']}: swap pause p99 ms"] = row["pause_p99_ms"]
    return out


__all__ = ["run_serve_bench"]
