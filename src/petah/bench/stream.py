"""``petah bench stream``: camera streams through a real station, one run, side by side.

Per frame size (640x480, 1280x720) an H.264 clip of FFmpeg's test pattern at 25 fps is made, and a
station process (the demo backbone and all its tasks, device engine) watches 1 / 4 / 8 copies of
it as looping sources (each decoded by its own ``ffmpeg`` at the clip's rate, as cameras send)
with a JSON-lines sink. Measured over ``seconds`` after a warm-up: answered frames/s, frames
skipped as stale, the age of each answer at the sink (frame decoded -> answer) p50 / p99, the
decoders' CPU (their own processes) and the sink thread's CPU apart from the station's, and —
in this process, on the same frames — the frames/s of the same engine running the same batches
(one frame per stream) back to back: what the line costs against inference alone; and again with
the same decoders running beside it (their frames thrown away): what the line costs beyond decoding,
which on a small device takes cores from the model.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from petah.errors import PetahError
from petah.serve.client import StationClient, station_process
from petah.serve.sources import process_cpu_s

SIZES = ((640, 480), (1280, 720))
FPS = 25


def make_clip(folder: Path, width: int, height: int, seconds: int = 8) -> Path:
    path = folder / f"clip-{width}x{height}.mp4"
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i",
                    f"testsrc2=size={width}x{height}:rate={FPS}", "-t", str(seconds), "-c:v", "libx264", "-pix_fmt",
                    "yuv420p", "-g", str(FPS), str(path)], check=True, timeout=300)
    return path


def clip_frames(clip: Path, count: int, width: int | None = None) -> list[np.ndarray]:
    """The clip's first ``count`` frames as (3, H, W) uint8 (scaled to ``width`` as a source would)."""
    scale = ["-vf", f"scale={width}:-2"] if width else []
    raw = subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(clip), "-frames:v", str(count), *scale,
                          "-f", "image2pipe", "-c:v", "ppm", "pipe:1"], check=True, capture_output=True).stdout
    frames, offset = [], 0
    while offset < len(raw):
        header = raw[offset:offset + 64].split(b"\n", 3)
        width, height = map(int, header[1].split())
        offset += len(header[0]) + len(header[1]) + len(header[2]) + 3
        size = width * height * 3
        frames.append(np.frombuffer(raw[offset:offset + size], np.uint8).reshape(height, width, 3).transpose(2, 0, 1))
        offset += size
    return frames


def decoders(clip: Path, streams: int, width: int | None = None) -> list[subprocess.Popen]:
    """``streams`` decoders of the clip at its own rate, as the station runs them, frames discarded."""
    scale = ["-vf", f"scale={width}:-2"] if width else []
    return [subprocess.Popen(["ffmpeg", "-nostdin", "-loglevel", "error", "-re", "-stream_loop", "-1", "-i", str(clip),
                              "-an", *scale, "-f", "image2pipe", "-c:v", "ppm", "-y", os.devnull])
            for _ in range(streams)]


def in_process_rate(frames: list[np.ndarray], streams: int, seconds: float = 4.0, threads: int = 0,
                    beside: Path | None = None, width: int | None = None) -> float:
    """Frames/s of the device engine running batches of ``streams`` frames, all demo tasks, back to
    back; with ``beside`` (the clip), while ``streams`` decoders of it run."""
    from petah.serve import demo_device_backbone, demo_packages
    from petah.serve.engine import DeviceEngine

    engine = DeviceEngine(demo_device_backbone(), threads or (os.cpu_count() or 1))
    names = []
    for path in demo_packages(on_device=True):
        engine.install(engine.prepare(path, path.stem))
        names.append(path.stem)
    batches = [[frames[(i * streams + j) % len(frames)] for j in range(streams)] for i in range(8)]
    engine.run(batches[0], names, 3)  # warm-up
    running = decoders(beside, streams, width) if beside is not None else []
    try:
        time.sleep(1.0 if running else 0.0)
        done, began = 0, time.perf_counter()
        while time.perf_counter() - began < seconds:
            engine.run(batches[done % len(batches)], names, 3)
            done += 1
        return done * streams / (time.perf_counter() - began)
    finally:
        for proc in running:
            proc.kill()
            proc.wait()


def measure(clip: Path, streams: int, seconds: float, warmup: float, folder: Path, width: int | None = None) -> dict:
    out = folder / f"out-{clip.stem}-{streams}-{width}.jsonl"
    scaled = f",width={width}" if width else ""
    sources = [arg for i in range(streams) for arg in ("--source", f"cam{i}={clip},loop{scaled}")]
    with station_process("--demo", "--engine", "device", "--state-dir",
                         str(folder / f"state-{clip.stem}-{streams}-{width}"),
                         *sources, "--sink", f"jsonl:{out}") as (proc, url):
        client = StationClient(url)

        def status() -> dict:
            return {"sources": client.request("GET", "/v1/sources").json()["sources"],
                    "sinks": client.request("GET", "/v1/sinks").json()["sinks"]}

        deadline = time.monotonic() + 60
        while not all(s["state"] == "streaming" for s in status()["sources"]):
            if time.monotonic() > deadline:
                raise PetahError(f"bench stream: the sources did not start: {status()['sources']}")
            time.sleep(0.2)
        time.sleep(warmup)
        first, cpu0, t0 = status(), process_cpu_s(proc.pid), time.time()
        time.sleep(seconds)
        last, cpu1, t1 = status(), process_cpu_s(proc.pid), time.time()
    elapsed = t1 - t0
    taken = sum(s["taken"] for s in last["sources"]) - sum(s["taken"] for s in first["sources"])
    decoded = sum(s["decoded"] for s in last["sources"]) - sum(s["decoded"] for s in first["sources"])
    dropped = sum(s["dropped"] for s in last["sources"]) - sum(s["dropped"] for s in first["sources"])
    decode_cpu = sum(s["decode_cpu_s"] for s in last["sources"]) - sum(s["decode_cpu_s"] for s in first["sources"])
    sink_cpu = last["sinks"][0]["send_cpu_s"] - first["sinks"][0]["send_cpu_s"]
    ages = sorted(r["latency_ms"] for r in map(json.loads, out.read_text().splitlines())
                  if t0 <= r["frame_time"] <= t1)
    return {"streams": streams, "seconds": round(elapsed, 1), "answered_fps": round(taken / elapsed, 1),
            "decoded_fps": round(decoded / elapsed, 1), "dropped_fps": round(dropped / elapsed, 1),
            "age_ms_p50": ages[len(ages) // 2] if ages else None,
            "age_ms_p99": ages[min(len(ages) - 1, int(0.99 * len(ages)))] if ages else None,
            "decode_cores": round(decode_cpu / elapsed, 3), "sink_cores": round(sink_cpu / elapsed, 3),
            "station_cores": round((cpu1 - cpu0) / elapsed, 3)}


def run_stream_bench(streams: tuple[int, ...] = (1, 4, 8), sizes=SIZES, seconds: float = 20.0,
                     warmup: float = 5.0, width: int | None = None) -> dict:
    """With ``width``, every source has the decoder scale its frames to that width (``width=N``)."""
    if shutil.which("ffmpeg") is None:
        raise PetahError("bench stream needs ffmpeg (apt-get install ffmpeg)")
    scaled = width
    results = {}
    with tempfile.TemporaryDirectory(prefix="petah-bench-stream-") as tmp:
        folder = Path(tmp)
        for width, height in sizes:
            clip = make_clip(folder, width, height)
            frames = clip_frames(clip, 16, scaled)
            rows = []
            for n in streams:
                row = measure(clip, n, seconds, warmup, folder, scaled)
                inference = in_process_rate(frames, n)
                beside = in_process_rate(frames, n, beside=clip, width=scaled)
                offered = n * FPS
                # a source's thread takes its newest frame when its last answer comes back: an answer's
                # age is at most one frame interval + one batch of the station (n frames per batch)
                station_batch_ms = 1000 * n / row["answered_fps"] if row["answered_fps"] else None
                row.update({"in_process_fps": round(inference, 1), "in_process_beside_decoders_fps": round(beside, 1),
                            "offered_fps": offered,
                            "vs_in_process": round(row["answered_fps"] / min(inference, offered), 3),
                            "vs_in_process_beside_decoders": round(row["answered_fps"] / min(beside, offered), 3),
                            "in_process_batch_ms": round(1000 * n / inference, 1),
                            "station_batch_ms": round(station_batch_ms, 1) if station_batch_ms else None,
                            "age_target_ms": round(station_batch_ms + 1000 / FPS, 1) if station_batch_ms else None})
                rows.append(row)
            results[f"{width}x{height}" + (f" scaled to {scaled} wide" if scaled else "")] = rows
    return {"fps": FPS, "seconds": seconds, "tasks": "all demo tasks", "width": scaled, "sizes": results}


__all__ = ["run_stream_bench"]
