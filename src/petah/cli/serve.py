"""``petah serve``: the inspection station (HTTP API, metrics, web page) on one resident backbone."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from petah.cli.common import SizeOpt, WeightsOpt, config_options
from petah.errors import PetahError
from petah.serve.config import ServeConfig
from petah.serve.drift import DriftConfig


@config_options(ServeConfig, "config")
@config_options(DriftConfig, "drift")
def serve(
    config: ServeConfig,
    drift: DriftConfig,
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

    config.drift = drift
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


COMMANDS = {"serve": serve}
