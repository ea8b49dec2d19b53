"""``petah serve``: the inspection station (HTTP API, metrics, web page) on one resident backbone."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from petah.cli.common import JsonOpt, SizeOpt, WeightsOpt, config_options, emit_json, out
from petah.errors import PetahError
from petah.serve.capture import CaptureConfig
from petah.serve.config import ServeConfig
from petah.serve.drift import DriftConfig
from petah.serve.line import LineConfig


@config_options(ServeConfig, "config")
@config_options(DriftConfig, "drift")
@config_options(CaptureConfig, "capture")
@config_options(LineConfig, "line")
def serve(
    config: ServeConfig,
    drift: DriftConfig,
    capture: CaptureConfig,
    line: LineConfig,
    backbone_spec: Annotated[str | None, typer.Option(
        "--backbone", "-b", help="A device backbone folder (petah export --device: no torch needed), a petah "
                                 "backbone file, or a timm model name (not with --demo).")] = None,
    weights: WeightsOpt = "none",
    img_size: SizeOpt = None,
    package: Annotated[list[Path] | None, typer.Option(
        "--package", "-p", help="A .petah package to install at start (repeatable).")] = None,
    packages: Annotated[Path | None, typer.Option(
        "--packages", help="A folder whose .petah files are installed at start.")] = None,
    state_dir: Annotated[Path, typer.Option(
        "--state-dir", help="Where the installed set and its package files persist across restarts.")
                         ] = Path("petah-station"),
    demo: Annotated[bool, typer.Option(
        "--demo", help="Serve the bundled demo backbone with its four demo packages.")] = False,
) -> None:
    """Serve every task over HTTP on one resident backbone: /v1/predict, /v1/tasks, admin task
    swaps, /healthz, /metrics and the inspection page at /. Stops cleanly on SIGTERM / Ctrl-C."""
    from petah.serve import Station, bind, demo_on_device, demo_packages, run_station, station_backbone

    config.drift, config.capture, config.line = drift, capture, line
    if demo == (backbone_spec is not None):
        raise PetahError("give either --backbone (-b) or --demo")
    files = list(package or [])
    if packages is not None:
        if not packages.is_dir():
            raise PetahError(f"--packages {packages}: not a folder")
        home = state_dir.resolve()
        if packages.resolve() == home or home in packages.resolve().parents:
            raise PetahError(f"--packages {packages} is inside --state-dir {state_dir}: the station keeps its own "
                             "files there; give a folder outside it")
        files += sorted(packages.glob("*.petah"))
    for path in files:
        if not path.is_file():
            raise PetahError(f"package not found: {path}")
    if demo:
        files = demo_packages(demo_on_device(config.engine)) + files
    sock = bind(config)  # a taken port fails before the backbone loads
    try:
        station = Station(station_backbone(backbone_spec, weights, img_size, demo=demo, engine=config.engine),
                          state_dir, config, packages=files)
    except BaseException:
        sock.close()
        raise
    run_station(station, sock)


capture_app = typer.Typer(no_args_is_help=True, help="Images a station captured: export them for the next adapt.")


@capture_app.command("export")
def capture_export(
    folder: Annotated[Path, typer.Argument(help="A station's --capture-dir.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="A new (or empty) folder for the data sets.")],
    include_unreviewed: Annotated[bool, typer.Option(
        "--include-unreviewed", help="Also the answers no operator confirmed (the station's own labels).")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Write the reviewed captures as data sets `petah adapt` reads: per task, class folders
    (classification), images/ + masks/ (segmentation), COCO JSON (detection), good/ + defect/ (anomaly)."""
    from petah.serve.capture import export_captures

    summary = export_captures(folder, output, include_unreviewed)
    if json_out:
        emit_json(summary)
        return
    for task, count in sorted(summary["tasks"].items()):
        out.print(f"{task}: {count} image(s) in {Path(summary['output']) / task}", highlight=False)
    if not summary["tasks"]:
        out.print(f"nothing reviewed to export among {summary['captures']} capture(s): review them on the station's "
                  "page, or pass --include-unreviewed", highlight=False)


COMMANDS = {"serve": serve}
