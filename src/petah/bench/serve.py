"""``petah bench serve``: the station measured as a client sees it, every figure from one run.

Real station processes (``petah serve`` on 127.0.0.1) with the demo backbone and its four demo
packages; clients are threads of this process, each with its own keep-alive connection, sending
one image per request for every task. Measured per engine: requests/s and p50 / p99 latency at
1 / 4 / 16 concurrent clients with batching on (``--max-batch 16``) and off (``--max-batch 1``);
the pause the inference thread spends on a swap (p50 / p99 over flips between two versions of a
task, under load); resident memory with 1 / 4 / 8 tasks loaded. The clients share the CPU with
the server, as a line PC's camera software would: the absolute figures are for that setting,
the ratios are what to compare.
"""

from __future__ import annotations

import io
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from petah.backbones import demo_backbone_path
from petah.errors import PetahError
from petah.serve import DEMO_PACKAGES, demo_packages
from petah.serve.client import StationClient, station_process
from petah.serve.metrics import quantile_ms

ADMIN_TOKEN = "bench-admin-token-0123456789abcdef"
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


def drive(url: str, clients: int, seconds: float, images: list[bytes], tasks: list[str] | None = None,
          stop: threading.Event | None = None) -> dict:
    """``clients`` threads sending requests back to back for ``seconds`` (or until ``stop``):
    throughput and latency."""
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
            reply = own.predict([(f"{k}.png", images[k % len(images)])], tasks)
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


def measure_throughput(engine: str, batching: str, clients: tuple[int, ...], seconds: float, state: Path,
                       images: list[bytes], threads: int) -> list[dict]:
    with station_process("--demo", "--state-dir", str(state), "--engine", engine, "--threads", str(threads),
                         *BATCHING[batching]) as (_proc, url):
        drive(url, 1, min(1.0, seconds), images)  # warm-up
        return [{"engine": engine, "batching": batching, **drive(url, n, seconds, images)} for n in clients]


def measure_swaps(engine: str, state: Path, swaps: int, images: list[bytes], threads: int,
                  token_file: Path) -> dict:
    """Flip a task between two versions ``swaps`` times while 4 clients keep predicting: the
    inference thread's pauses (each swap, and the clean-up after it: what a request can wait for)
    and the requests' latencies, beside the same load without swaps (preparing a version beside
    inference takes CPU from it: requests slow down, none stops)."""
    packages = {p.stem: p.read_bytes() for p in demo_packages()}
    with station_process("--demo", "--state-dir", str(state), "--engine", engine, "--threads", str(threads),
                         "--admin-token-file", str(token_file)) as (_proc, url):
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


def measure_memory(engine: str, state: Path, threads: int, token_file: Path, images: list[bytes]) -> dict:
    """Resident bytes with 1, 4 and 8 tasks (the four demo packages under two names each)."""
    packages = [(p.stem, p.read_bytes()) for p in demo_packages()]
    plan = [(f"{stem}-{copy}", data) for copy in (1, 2) for stem, data in packages]
    rows = {}
    with station_process("-b", str(demo_backbone_path()), "--state-dir", str(state), "--engine", engine,
                         "--threads", str(threads), "--admin-token-file", str(token_file)) as (_proc, url):
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


def run_serve_bench(engines: tuple[str, ...] = ("torch", "onnx"), clients: tuple[int, ...] = (1, 4, 16),
                    seconds: float = 4.0, swaps: int = 40, threads: int = 2) -> dict:
    images = bench_images()
    with tempfile.TemporaryDirectory(prefix="petah-bench-serve-") as tmp:
        root = Path(tmp)
        token_file = root / "admin-token"
        token_file.write_text(ADMIN_TOKEN)
        throughput = []
        for engine in engines:
            for batching in ("on", "off"):
                throughput += measure_throughput(engine, batching, clients, seconds, root / f"t-{engine}-{batching}",
                                                 images, threads)
        swap_rows = [measure_swaps(e, root / f"s-{e}", swaps, images, threads, token_file) for e in engines]
        memory = [measure_memory(e, root / f"m-{e}", threads, token_file, images) for e in engines]
    return {"tasks": list(DEMO_PACKAGES), "threads": threads, "seconds_per_point": seconds,
            "throughput": throughput, "swaps": swap_rows, "memory": memory,
            "ratios": ratios(throughput, swap_rows, memory, clients)}


def ratios(throughput: list[dict], swaps: list[dict], memory: list[dict], clients: tuple[int, ...]) -> dict:
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
    for row in memory:
        out[f"{row['engine']}: resident bytes per added task / its package bytes"] = row["ratio_to_package_bytes"]
    for row in swaps:
        out[f"{row['engine']}: swap pause p99 ms"] = row["pause_p99_ms"]
    return out


__all__ = ["run_serve_bench"]
