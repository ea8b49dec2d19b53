"""The bench verbs: side-by-side measurements (latency, pruning, adaptation methods) in one run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from petah.cli.common import JsonOpt, config_options, emit_json, out
from petah.errors import PetahError
from petah.prune.pruner import PruneConfig
from petah.serve.drift import DriftConfig

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: side-by-side measurements in one run.")


@bench_app.command("latency")
def bench_latency(
    model: Annotated[str, typer.Option("--model", help="timm backbone name.")] = "efficientformerv2_s0",
    img_size: Annotated[int, typer.Option("--img-size")] = 224,
    batch: Annotated[int, typer.Option("--batch")] = 1,
    repeats: Annotated[int, typer.Option(help="Interleaved repeats per variant (median reported).")] = 20,
    trunk_stages: Annotated[int, typer.Option("--trunk-stages",
                            help="Leading stages the shared-trunk tasks leave unadapted.")] = 3,
    json_out: JsonOpt = False,
) -> None:
    """Plain vs unmerged vs merged (torch, ONNX, ORT adapters), shared trunk, task switching."""
    from petah.bench.latency import run_latency

    result = run_latency(model, img_size, batch, repeats, trunk_stages)
    if json_out:
        emit_json(result)
        return
    table = Table(title=f"{model} @ {img_size}px, batch {batch}, {result['threads']} threads: median of {repeats}")
    table.add_column("variant")
    table.add_column("ms", justify="right")
    for key, value in result["latency_ms"].items():
        table.add_row(key, f"{value:.2f}")
    for key, value in result["switch_ms"].items():
        table.add_row(f"switch: {key}", f"{value:.3f}")
    for n, row in result["shared_trunk"].items():
        if n != "stages":
            table.add_row(f"{n} task(s): naive / shared trunk ({result['shared_trunk']['stages']} stages)",
                          f"{row['naive_s']:.1f} / {row['shared_s']:.1f} ({row['speedup']:.2f}x)")
    out.print(table)
    out.print(", ".join(f"{k} = {v}" for k, v in result["ratios"].items()))


@bench_app.command("serve")
def bench_serve(
    engines: Annotated[str, typer.Option("--engines", help="Comma-separated engines to measure.")
                       ] = "device,onnx,torch",
    seconds: Annotated[float, typer.Option("--seconds", help="Seconds of load per measured point.")] = 4.0,
    swaps: Annotated[int, typer.Option("--swaps", help="Swaps timed per engine.")] = 40,
    threads: Annotated[int, typer.Option("--threads", help="The station's inference threads.")] = 2,
    device_python: Annotated[str | None, typer.Option(
        "--device-python", help="The interpreter of a device install (no torch) to run the device engine's "
                                "stations with; its installed size is reported.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """The station under load: seconds to the first answer and memory at start; requests/s and p50 / p99
    at 1 / 4 / 16 clients per engine, batching on and off; swap pause; resident memory with 1 / 4 / 8 tasks."""
    from petah.bench.serve import run_serve_bench
    from petah.serve import ENGINES

    chosen = tuple(e.strip() for e in engines.split(",") if e.strip())
    if not chosen or any(e not in ENGINES or e == "auto" for e in chosen):
        raise PetahError(f"--engines takes device, onnx and / or torch, got {engines!r}")
    if seconds <= 0 or swaps < 1 or threads < 1:
        raise PetahError("--seconds must be > 0, --swaps and --threads at least 1")
    if device_python is not None and not Path(device_python).is_file():
        raise PetahError(f"--device-python {device_python}: no such interpreter")
    result = run_serve_bench(chosen, seconds=seconds, swaps=swaps, threads=threads, device_python=device_python)
    if json_out:
        emit_json(result)
        return
    table = Table(title=f"petah station, demo tasks, {threads} inference threads, {seconds:g} s per point")
    for column in ("engine", "batching", "clients", "requests/s", "p50 ms", "p99 ms", "failed"):
        table.add_column(column, justify="right")
    for row in result["throughput"]:
        table.add_row(row["engine"], row["batching"], str(row["clients"]), f"{row['requests_per_s']:.1f}",
                      str(row["p50_ms"]), str(row["p99_ms"]), str(row["failed"]))
    out.print(table)
    for key, value in result["ratios"].items():
        out.print(f"{key}: {value}")


@bench_app.command("int8")
def bench_int8(
    families: Annotated[str, typer.Option("--families", help="Comma-separated timm models timed at --size.")
                        ] = "efficientformerv2_s0,mobilevitv2_050,fastvit_sa12",
    size: Annotated[int, typer.Option("--size", help="Input size for the family latency rows.")] = 224,
    repeats: Annotated[int, typer.Option("--repeats", help="Interleaved ONNX Runtime runs per graph.")] = 40,
    transfer: Annotated[str, typer.Option(
        "--transfer", help="Comma-separated families adapted to digits from a bench-trained source, float vs int8 "
                           "accuracy ('' for none).")] = "mobilevitv2_050,fastvit_sa12",
    sources: Annotated[Path, typer.Option("--sources", help="Folder caching the bench-trained sources (shared with "
                                                            "petah bench methods).")] = Path("bench-methods/sources"),
    json_out: JsonOpt = False,
) -> None:
    """int8 vs float merged graphs: the demo tasks' metrics and latency (64 px), other families'
    latency at --size, and other families' accuracy after adaptation (64 px)."""
    from petah.bench.int8 import run_int8_bench
    from petah.bench.methods import REFERENCES

    chosen = tuple(f.strip() for f in families.split(",") if f.strip())
    adapted = tuple(f.strip() for f in transfer.split(",") if f.strip())
    if size < 32 or repeats < 1:
        raise PetahError("--size must be at least 32 and --repeats at least 1")
    unknown = [f for f in adapted if f not in REFERENCES]
    if unknown:
        raise PetahError(f"--transfer {unknown[0]}: no bench source recipe for it; choose from {', '.join(REFERENCES)}")
    result = run_int8_bench(chosen, size, repeats=repeats, transfer_families=adapted, sources=sources)
    if json_out:
        emit_json(result)
        return
    table = Table(title="demo tasks, 64 px: float vs int8 merged graphs (ONNX Runtime)")
    for column in ("task", "metric", "float", "int8", "delta", "int8 speed-up", "auto", "auto speed-up", "MB"):
        table.add_column(column, justify="right")
    for r in result["demo_tasks"]:
        table.add_row(r["task"], r["metric"], f"{r['float']:.2f}", f"{r['int8']:.2f}", f"{r['delta']:+.2f}",
                      f"{r['int8_speedup']:.2f}x", "int8" if r["auto_quantized"] else "float",
                      f"{r['auto_speedup']:.2f}x", f"{r['float_bytes'] / 1e6:.1f} -> {r['int8_bytes'] / 1e6:.1f}")
    out.print(table)
    table = Table(title=f"families at {size} px: latency")
    for column in ("backbone", "float ms", "int8 ms", "speed-up"):
        table.add_column(column, justify="right")
    for r in result["families"]:
        table.add_row(r["backbone"], f"{r['float_ms']:.2f}", f"{r['int8_ms']:.2f}", f"{r['int8_speedup']:.2f}x")
    if result["transfer"]:
        out.print(table)
        table = Table(title="families adapted to digits from a bench-trained source, 64 px: accuracy")
        for column in ("backbone", "float", "int8", "delta", "int8 speed-up"):
            table.add_column(column, justify="right")
        for r in result["transfer"]:
            table.add_row(r["backbone"], f"{r['float']:.2f}", f"{r['int8']:.2f}", f"{r['delta']:+.2f}",
                          f"{r['int8_speedup']:.2f}x")
    out.print(table)


@bench_app.command("anomaly")
def bench_anomaly(
    one_class: Annotated[str, typer.Option(
        "--one-class", help="Comma-separated built-in classification sets run as one-class benchmarks (each class "
                            "in turn as good; '' for none).")] = "textures,faces",
    repeats: Annotated[int, typer.Option("--repeats", help="Interleaved runtime calls per latency figure.")] = 30,
    json_out: JsonOpt = False,
) -> None:
    """The anomaly task vs PatchCore by the book on the demo backbone: image / pixel AUROC, bytes,
    latency vs a classification task."""
    from petah.bench.anomaly import run_anomaly_bench
    from petah.data import BUILTIN

    sets = tuple(s.strip() for s in one_class.split(",") if s.strip())
    unknown = [s for s in sets if s not in BUILTIN or s in ("defects", "digit-boxes", "surface-anomalies")]
    if unknown:
        raise PetahError(f"--one-class {unknown[0]}: not a built-in classification set")
    if repeats < 1:
        raise PetahError("--repeats must be at least 1")
    result = run_anomaly_bench(sets, repeats)
    if json_out:
        emit_json(result)
        return
    table = Table(title=f"anomaly: petah vs PatchCore by the book on {result['backbone']}")
    for column in ("set", "petah AUROC", "book AUROC", "petah pixel", "book pixel", "petah % bytes", "book % bytes"):
        table.add_column(column, justify="right")
    show = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for r in result["sets"]:
        p, b = r["petah"], r["patchcore"]
        table.add_row(r["set"], show(p["image_auroc"]), show(b["image_auroc"]), show(p["pixel_auroc"]),
                      show(b["pixel_auroc"]), f"{p['percent']:.2f}", f"{b['percent']:.2f}")
    out.print(table)
    for r in result["latency"]:
        out.print(f"batch {r['batch']}: anomaly {r['anomaly_ms']:.2f} ms / image, classification "
                  f"{r['classification_ms']:.2f} ms ({r['ratio']:.2f}x)")
    out.print(f"targets: {result['targets']}")


@bench_app.command("drift")
@config_options(DriftConfig, "drift")
def bench_drift(
    drift: DriftConfig,
    tasks: Annotated[str, typer.Option("--tasks", help="Comma-separated built-in classification sets.")
                     ] = "digits,textures",
    unshifted: Annotated[int, typer.Option("--unshifted", help="Unshifted requests counted for false alarms.")
                         ] = 30_000,
    shifted: Annotated[int, typer.Option("--shifted", help="Most shifted requests sent per shift.")] = 1000,
    epochs: Annotated[int, typer.Option("--epochs", help="Training epochs of each task.")] = 10,
    recover: Annotated[str, typer.Option(
        "--recover", help="Shifts to run the loop for (capture, review, export, adapt, gate), comma-separated; "
                          "'' for none.")] = "new background",
    stream: Annotated[int, typer.Option("--stream", help="Shifted requests the capture store watches per loop.")
                      ] = 1000,
    json_out: JsonOpt = False,
) -> None:
    """The drift check on built-in tasks: false alarms without a shift; per shift (brightness, blur,
    a new background) the requests to the alarm and the label-free estimate against the truth; then
    the loop: capture -> review -> export -> adapt -> gate, and the accuracy it wins back."""
    from petah.bench.drift import SHIFTS, run_drift_bench
    from petah.data import BUILTIN

    names = tuple(t.strip() for t in tasks.split(",") if t.strip())
    dense = ("defects", "digit-boxes", "surface-anomalies")
    unknown = [t for t in names if t not in BUILTIN or t in dense]
    if unknown or not names:
        raise PetahError(f"--tasks {','.join(unknown) or repr(tasks)}: not a built-in classification set (one of "
                         f"{', '.join(b for b in BUILTIN if b not in dense)})")
    loops = tuple(s.strip() for s in recover.split(",") if s.strip())
    if set(loops) - set(SHIFTS):
        raise PetahError(f"--recover {recover!r}: shifts are {', '.join(SHIFTS)}")
    if unshifted < 1 or shifted < drift.window or epochs < 1 or stream < 1:
        raise PetahError("--unshifted, --epochs and --stream must be at least 1, --shifted at least --drift-window")
    result = run_drift_bench(names, unshifted, shifted, epochs, config=drift, recover_shifts=loops, stream=stream)
    if json_out:
        emit_json(result)
        return
    table = Table(title="drift check: requests to the alarm, estimated vs true accuracy (points)")
    for column in ("task", "shift", "true", "estimated", "to alarm", "input drift", "feature drift"):
        table.add_column(column, justify="right")
    for name, row in result["tasks"].items():
        table.add_row(name, f"none ({row['false_alarms']} alarms / {row['unshifted_requests']:,})",
                      f"{row['true_accuracy']:.1f}", str(row["estimated_accuracy"]), "-", str(row["input_drift"]),
                      str(row["feature_drift"]))
        for shift, r in row["shifts"].items():
            table.add_row("", shift, f"{r['true_accuracy']:.1f}", str(r["estimated_accuracy"]),
                          str(r["requests_to_alarm"]), str(r["input_drift"]), str(r["feature_drift"]))
    out.print(table)
    for name, row in result["tasks"].items():
        for shift, r in row.get("loop", {}).items():
            out.print(f"{name}, {shift}: captured {r['captured']} of {r['requests']} ({r['captured_wrong']} answered "
                      f"wrong); gate {r['gate']}; shifted accuracy {r['shifted_accuracy_before']} -> "
                      f"{r['shifted_accuracy_after']} (recovered {r['recovered_share']} of the loss), unshifted "
                      f"{r['unshifted_accuracy_after']}", highlight=False)


@bench_app.command("soak")
def bench_soak(
    minutes: Annotated[float, typer.Option("--minutes", help="Phase 1: minutes under load, swaps and rollbacks.")
                       ] = 30.0,
    restart_minutes: Annotated[float, typer.Option(
        "--restart-minutes", help="Phase 2: minutes with a kill -9 and a restart every --restart-every-s.")] = 10.0,
    restart_s: Annotated[float, typer.Option("--restart-every-s", help="Seconds between kills in phase 2.")] = 180.0,
    clients: Annotated[int, typer.Option("--clients", help="Concurrent clients.")] = 4,
    release_s: Annotated[float, typer.Option(
        "--release-every-s", help="Seconds between hub release steps (publish, then withdraw); 0: no hub.")] = 60.0,
    device_python: Annotated[str | None, typer.Option(
        "--device-python", help="Run the station with this interpreter (a device install).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """A station under steady load for a long while: memory slope (PSS, 95 % interval), file
    descriptors, threads, state / capture / log bytes, p99 latency, failed requests; then restarts."""
    from petah.bench.soak import run_soak

    if minutes <= 0 or restart_minutes < 0 or restart_s <= 0 or clients < 1 or release_s < 0:
        raise PetahError("--minutes and --restart-every-s must be positive, --restart-minutes and --release-every-s "
                         "at least 0, --clients at least 1")
    if device_python is not None and not Path(device_python).is_file():
        raise PetahError(f"--device-python {device_python}: no such interpreter")
    result = run_soak(minutes, restart_minutes, restart_s, clients, device_python=device_python,
                      release_s=release_s or None)
    if json_out:
        emit_json(result)
        return
    slope = result["pss_mb_slope_per_hour"]
    out.print(f"PSS {result['pss_mb']} MB; slope {slope['per_hour']} MB/h (95 %: {slope['low']} .. {slope['high']}, "
              f"extrapolated); fds {result['fds']}, threads {result['threads']}; p99 {result['p99_ms_first_last']} ms; "
              f"{result['counts']}; restarts took {result['restart_seconds']} s; end {result['end']}", highlight=False)


@bench_app.command("stream")
def bench_stream(
    streams: Annotated[str, typer.Option("--streams", help="Concurrent streams, comma-separated.")] = "1,4,8",
    seconds: Annotated[float, typer.Option("--seconds", help="Seconds measured per setting.")] = 20.0,
    width: Annotated[int | None, typer.Option("--width", help="Sources scale frames to this width in the decoder "
                                                              "(the source option width=N).")] = None,
    sizes: Annotated[str, typer.Option("--sizes", help="Frame sizes, comma-separated WxH.")] = "640x480,1280x720",
    json_out: JsonOpt = False,
) -> None:
    """Camera streams through a station: answered frames/s against inference alone, stale frames
    skipped, the age of each answer, decode and sink CPU apart (H.264, 640x480 and 1280x720, 25 fps)."""
    from petah.bench.stream import run_stream_bench

    try:
        counts = tuple(int(n) for n in streams.split(",") if n.strip())
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1 or max(counts) > 32 or seconds <= 0:
        raise PetahError(f"--streams {streams!r}: 1..32 streams each, comma-separated; --seconds positive")
    try:
        frame_sizes = tuple(tuple(int(v) for v in size.lower().split("x")) for size in sizes.split(",") if size.strip())
    except ValueError:
        frame_sizes = ()
    if not frame_sizes or any(len(size) != 2 or not (16 <= min(size) and max(size) <= 4096) for size in frame_sizes):
        raise PetahError(f"--sizes {sizes!r}: write WxH[,WxH…], 16..4096 pixels a side")
    if width is not None and not 16 <= width <= 4096:
        raise PetahError(f"--width must be 16..4096 pixels, got {width}")
    result = run_stream_bench(counts, sizes=frame_sizes, seconds=seconds, width=width)
    if json_out:
        emit_json(result)
        return
    table = Table(title="streams through a station (all demo tasks per frame)")
    for column in ("size", "streams", "answered fps", "in-process fps (beside decoders)", "vs in-process (beside)",
                   "skipped fps", "age p50 / p99 ms", "age target ms", "decode cores", "sink cores", "station cores"):
        table.add_column(column, justify="right")
    for size, rows in result["sizes"].items():
        for r in rows:
            table.add_row(size, str(r["streams"]), str(r["answered_fps"]),
                          f"{r['in_process_fps']} ({r['in_process_beside_decoders_fps']})",
                          f"{r['vs_in_process']} ({r['vs_in_process_beside_decoders']})", str(r["dropped_fps"]),
                          f"{r['age_ms_p50']} / {r['age_ms_p99']}",
                          str(r["age_target_ms"]), str(r["decode_cores"]), str(r["sink_cores"]),
                          str(r["station_cores"]))
    out.print(table)


@bench_app.command("fleet")
def bench_fleet(
    devices: Annotated[str, typer.Option("--devices", help="Stations (one of them a child process that is killed "
                                                           "mid-install and restarted); with --sim, comma-separated "
                                                           "counts.")] = "20",
    poll_s: Annotated[float, typer.Option("--poll-s", help="The stations' poll interval.")] = 0.5,
    timeout_s: Annotated[float, typer.Option("--timeout-s", help="Longest wait for one release to settle.")
                         ] = 240.0,
    sim: Annotated[bool, typer.Option("--sim", help="Simulated stations (the protocol only, no model) against "
                                                    "real hub processes: one on SQLite, one and two on PostgreSQL.")
                   ] = False,
    configs: Annotated[str, typer.Option("--configs", help="With --sim: which of sqlite-1, postgresql-1, "
                                                           "postgresql-2 (database-hub processes).")
                       ] = "sqlite-1,postgresql-1,postgresql-2",
    seconds: Annotated[float, typer.Option("--seconds", help="With --sim: the steady phase's length.")] = 20.0,
    connections: Annotated[int, typer.Option("--connections", help="With --sim: requests in flight at once.")] = 8,
    load_pause_s: Annotated[float | None, typer.Option(
        "--load-pause-s", help="Every station serves its own requests all along, one after another this many "
                               "seconds apart (a device serving while it updates).")] = None,
    hogs: Annotated[int, typer.Option("--hogs", help="Processes spinning on the CPU beside the fleet.")] = 0,
    runs: Annotated[int, typer.Option("--runs", help="Run the simulation this many times; count the runs in "
                                                     "which each outcome held.")] = 1,
    json_out: JsonOpt = False,
) -> None:
    """A hub and N stations on 127.0.0.1 with injected faults (dropped connections, truncated and
    corrupted downloads, delays, the hub down, a station killed mid-install, a bad release); with
    --sim, hub processes under thousands of simulated stations."""
    try:
        counts = [int(n) for n in devices.split(",") if n.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < (1 if sim else 3) or max(counts) > 100_000:
        raise PetahError(f"--devices {devices!r}: comma-separated counts, each 3..100000 (1.. with --sim)")
    if sim:
        if runs != 1 or hogs or load_pause_s is not None:
            raise PetahError("--runs, --hogs and --load-pause-s are for the stations' simulation, not --sim")
        _bench_fleet_sim(counts, configs, seconds, connections, timeout_s, json_out)
        return
    from petah.bench.fleet import OUTCOMES, run_fleet_bench

    if len(counts) != 1:
        raise PetahError("--devices takes one count without --sim")
    if runs < 1 or hogs < 0 or (load_pause_s is not None and load_pause_s < 0):
        raise PetahError("--runs must be at least 1, --hogs and --load-pause-s not negative")
    results = [run_fleet_bench(counts[0], poll_s=poll_s, timeout_s=timeout_s, load_pause_s=load_pause_s, hogs=hogs)
               for _ in range(runs)]
    if runs > 1:
        held = {key: sum(bool(r[key]) for r in results) for key in (*OUTCOMES, "every_refusal_names_its_measurement")}
        summary = {"runs": runs, "held": held, "results": results}
        if json_out:
            emit_json(summary)
            return
        out.print(", ".join(f"{k}: {v}/{runs}" for k, v in held.items()), highlight=False)
        return
    result = results[0]
    if json_out:
        emit_json(result)
        return
    table = Table(title=f"petah fleet, {counts[0]} stations, faults {result['faults_injected']}")
    for column in ("release", "state", "reached", "s to 50 %", "s to 100 %", "retries", "bytes/station",
                   "vs whole model"):
        table.add_column(column, justify="right")
    for name, row in result["releases"].items():
        table.add_row(name, row["state"], f"{row['stage_reached']} %", str(row["seconds_to_stage"].get("50%", "-")),
                      str(row["seconds_to_100"] or "-"), str(row["retries"]), str(row["bytes_per_station"]),
                      f"{row['bytes_vs_whole_model']:.1%}")
    out.print(table)
    out.print(", ".join(f"{k} = {result[k]}" for k in OUTCOMES))


def _bench_fleet_sim(counts: list[int], configs: str, seconds: float, connections: int, timeout_s: float,
                     json_out: bool) -> None:
    from petah.bench.fleet_sim import run_fleet_sim

    result = run_fleet_sim(counts, configs=tuple(c.strip() for c in configs.split(",") if c.strip()),
                           seconds=seconds, connections=connections, timeout_s=timeout_s)
    if json_out:
        emit_json(result)
        return
    table = Table(title=f"hub processes under simulated stations ({connections} requests in flight)")
    for column in ("stations", "config", "polls/s", "p50 / p99 ms", "hub CPU ms/poll", "db ms/poll",
                   "lock wait ms/poll", "db server CPU ms/poll", "release to 100 % s", "stages once", "reports kept"):
        table.add_column(column, justify="right")
    for r in result["rows"]:
        steady, release = r["steady"], r["release"]
        table.add_row(str(r["devices"]), r["config"], str(steady["polls_per_s"]),
                      f"{steady['latency_ms_p50']} / {steady['latency_ms_p99']}", str(steady["hub_cpu_ms_per_poll"]),
                      str(steady["db_transaction_ms_per_poll"]), str(steady["lock_wait_ms_per_poll"]),
                      str(steady.get("db_server_cpu_ms_per_poll", "-")), str(release["seconds_to_100"]),
                      str(release["each_stage_once"]), str(release["no_report_lost"]))
    out.print(table)


@bench_app.command("prune")
@config_options(PruneConfig, "config", only=("recover_epochs",), defaults={"recover_epochs": 3})
def bench_prune(
    output: Annotated[Path, typer.Option("--output", "-o",
                      help="Folder for the JSON and the PNG plot.")] = Path("bench-prune"),
    ratios: Annotated[str, typer.Option(help="Comma-separated pruning ratios (0 is always included).")] = "0,0.25,0.5",
    backbone: Annotated[Path | None, typer.Option("--backbone", "-b",
                        help="Backbone file (default: the demo's).")] = None,
    repeats: Annotated[int, typer.Option(help="Interleaved ONNX Runtime repeats per ratio (median reported).")] = 50,
    structural: Annotated[str, typer.Option(
        help="Comma-separated timm models measured for size and latency only.")] = "efficientformer_l1",
    quick: Annotated[bool, typer.Option("--quick",
                     help="A smoke run: one task, a few steps, no recovery, no structural models.")] = False,
    auto_max_loss: Annotated[float | None, typer.Option(
        "--auto-max-loss", help="Add a row pruned by --policy auto at this --max-loss (0: no such row).")] = 1.0,
    int8: Annotated[bool, typer.Option("--int8/--no-int8", help="Also measure every row in int8.")] = True,
    json_out: JsonOpt = False,
    config: PruneConfig = None,
) -> None:
    """Pruning ratio vs params, MACs, bytes, ONNX Runtime latency and demo-task accuracy after adaptation;
    per-stage ratios chosen by --policy auto; each row also in int8."""
    from petah.bench.prune import run_prune_bench
    from petah.demo import DEMO_TASKS

    try:
        ratio_list = [float(r) for r in ratios.split(",") if r.strip()]
    except ValueError:
        raise PetahError(f"--ratios must be comma-separated numbers, got {ratios!r}") from None
    if backbone is not None and not backbone.is_file():
        raise PetahError(f"backbone file not found: {backbone}")
    models = tuple(m for m in structural.split(",") if m.strip())
    tasks, max_steps = DEMO_TASKS, None
    if quick:
        config = PruneConfig(recover_epochs=0, calibration_batches=1, batch_size=16, policy_seconds=20)
        tasks, max_steps, repeats, models = DEMO_TASKS[:1], 2, 5, ()
    result = run_prune_bench(output, ratio_list, backbone, tasks, config, repeats, max_steps, models,
                             auto_max_loss or None, int8)
    (output / "bench-prune.json").write_text(json.dumps(result, indent=2))
    if json_out:
        emit_json(result)
        return
    table = Table(title=f"{result['backbone']}, ONNX Runtime CPU, {result['threads']} threads, "
                        f"median of {result['repeats']}")
    for col in ("ratio", "params", "MACs", "bytes", "ms", "speedup", "mean score", "loss (pts)", "int8 speedup",
                "int8 loss (pts)"):
        table.add_column(col, justify="right")
    for r in result["rows"]:
        table.add_row(r["label"], f"{r['params']:,}", f"{r['macs'] / 1e6:.1f} M", f"{r['backbone_bytes']:,}",
                      f"{r['ort_ms']:.2f}", f"{r['speedup']:.2f}x", f"{r['mean_score']:.4f}", f"{r['loss_points']:.2f}",
                      f"{r['int8_speedup']:.2f}x" if "int8_speedup" in r else "-",
                      f"{r['int8_loss_points']:.2f}" if "int8_loss_points" in r else "-")
    out.print(table)
    for order, row in result["orders"].items():
        out.print(f"{order.replace('_', ' ')} at ratio {row['ratio']}: mean score {row['mean_score']:.4f}, "
                  f"{row['stored_bytes']:,} bytes stored for {len(row['tasks'])} task(s)")
    for name, rows in result["structural"].items():
        out.print(f"{name}: " + "; ".join(f"ratio {r['ratio']}: {r['params']:,} params, {r['macs'] / 1e6:.0f} M MACs, "
                                          f"{r['ort_ms']:.1f} ms ({r['speedup']:.2f}x)" for r in rows))
    out.print(f"plot: {result['plot']}")


@bench_app.command("methods")
def bench_methods(
    output: Annotated[Path, typer.Option("--output", "-o",
                      help="Folder for JSON, markdown and PNG plots.")] = Path("bench-methods"),
    backbone: Annotated[Path | None, typer.Option("--backbone", "-b",
                        help="Main backbone file (default: the demo's).")] = None,
    references: Annotated[str, typer.Option("--references", help="Comma-separated reference backbones the bench trains "
                                                               "itself; 'default' (with --full: all), 'all' (adds "
                                                               "efficientformer_l1) or 'none'.")] = "default",
    sources: Annotated[Path | None, typer.Option("--sources", help="Folder caching the trained reference sources "
                                                                       "(default: OUTPUT/sources).")] = None,
    seeds: Annotated[int, typer.Option(help="Seeds per method and task on the main backbone.")] = 3,
    full: Annotated[bool, typer.Option("--full", help="The whole grid: every backbone x every method x seeds, each "
                                       "choosing its rate, bigger sources (a bigger machine's job).")] = False,
    quick: Annotated[bool, typer.Option("--quick",
                     help="A smoke run: one task, a few methods and steps, one tiny reference.")] = False,
    budgets_only: Annotated[bool, typer.Option(
        "--budgets-only", help="Only the budget grid: --budget plans vs uniform rank, EVA-style allocation and "
                               "attn-lora at equal bytes (1 / 2 / 3 %), with one seed of full fine-tuning.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Adaptation methods side by side across backbones: accuracy, stored bytes, training speed, peak memory,
    latency; and the methods at equal byte budgets."""
    from petah.bench.methods import markdown, plots, run_suite, suite
    from petah.demo import demo_backbone_path

    if backbone is not None and not backbone.is_file():
        raise PetahError(f"backbone file not found: {backbone}")
    if quick and full:
        raise PetahError("--quick and --full exclude each other")
    grids = suite("quick" if quick else "full" if full else "default", str(backbone or demo_backbone_path()),
                  references, seeds, budgets_only)
    result = run_suite(grids, sources or output / "sources")
    output.mkdir(parents=True, exist_ok=True)
    result["plots"] = [str(p) for p in plots(result, output)]
    (output / "bench-methods.json").write_text(json.dumps(result, indent=1))
    (output / "bench-methods.md").write_text(markdown(result))
    if json_out:
        emit_json(result)
        return
    out.print(markdown(result))
    out.print(json.dumps({label: r["targets"] for label, r in result["backbones"].items()}, indent=1))
