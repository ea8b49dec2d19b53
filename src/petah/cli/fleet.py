"""Fleet verbs: ``petah hub init | serve | status | add-device | rotate-key`` and ``petah release``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from petah.cli.common import JsonOpt, emit_json, out
from petah.errors import PetahError

hub_app = typer.Typer(no_args_is_help=True, help="The release hub: TUF metadata, staged rollouts, device reports.")
RootOpt = Annotated[Path, typer.Option("--root", help="The hub's folder (metadata, targets, keys, hub.db).")]
HubOpt = Annotated[str, typer.Option("--hub", help="The hub's URL, e.g. http://127.0.0.1:8600.")]


@hub_app.command("init")
def hub_init(
    root: RootOpt,
    root_key: Annotated[Path, typer.Option("--root-key", help="The offline root key (NAME.key): signs root.json. "
                                                               "Keep it off the hub afterwards.")],
    release_key: Annotated[Path, typer.Option("--release-key", help="The release key (NAME.key): signs targets "
                                                                     "metadata (petah release --key).")],
    json_out: JsonOpt = False,
) -> None:
    """Create a hub folder: root metadata (root key), empty targets (release key), and an online
    snapshot / timestamp key kept in the folder. Prints the root.json to provision stations with."""
    from petah.fleet.metadata import init_repository

    trusted = init_repository(root, root_key, release_key)
    if json_out:
        emit_json({"root": str(root), "trust_root": str(trusted)})
        return
    out.print(f"hub folder {root} ready; provision stations with --trust-root {trusted}", highlight=False,
              soft_wrap=True)


@hub_app.command("serve")
def hub_serve(
    root: RootOpt,
    host: Annotated[str, typer.Option("--host", help="Address to bind (anything but loopback needs TLS).")
                    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port (0: any free port, printed at start).")] = 8600,
    ssl_keyfile: Annotated[str | None, typer.Option("--ssl-keyfile", help="TLS private key (PEM).")] = None,
    ssl_certfile: Annotated[str | None, typer.Option("--ssl-certfile", help="TLS certificate (PEM).")] = None,
) -> None:
    """Serve the hub until SIGTERM / Ctrl-C."""
    from petah.fleet.hub_app import HUB_MAX_REQUESTS, Hub, create_hub_app
    from petah.http import listen
    from petah.http_server import serve_guarded
    from petah.serve.config import is_loopback

    if not is_loopback(host) and not (ssl_keyfile and ssl_certfile):
        raise PetahError(f"--host {host} exposes the hub beyond this machine: give --ssl-keyfile and --ssl-certfile "
                         "(device tokens must not travel in clear text)")
    if not 0 <= port <= 65535:
        raise PetahError(f"--port must be 0..65535, got {port}")
    hub = Hub(root)
    sock = listen(host, port)
    scheme = "https" if ssl_certfile else "http"
    print(f"petah hub: {root} on {scheme}://{host}:{sock.getsockname()[1]}/", file=sys.stdout, flush=True)
    serve_guarded(create_hub_app(hub), sock, max_requests=HUB_MAX_REQUESTS, ssl_keyfile=ssl_keyfile,
                  ssl_certfile=ssl_certfile)


@hub_app.command("status")
def hub_status_command(hub: HubOpt, json_out: JsonOpt = False) -> None:
    """Each release's stage and per-stage counts, the device list, and the stations whose tasks drift."""
    from rich.table import Table

    from petah.fleet.client import hub_status

    status = hub_status(hub)
    if json_out:
        emit_json(status)
        return
    table = Table("release", "task", "version", "state", "stage", "stage devices", "promoted", "failed")
    for r in status["releases"]:
        counts = r["counts"]
        table.add_row(str(r["id"]), r["task"], r["version"], r["state"], f"{r['percent']} %",
                      str(counts["devices"]), str(counts["promoted"]), str(counts["failed"]))
    out.print(table)
    devices = Table("device", "backbone", "installed", "last seen (s ago)")
    import time

    for d in status["devices"]:
        installed = ", ".join(f"{k}={v[:12]}" for k, v in d["installed"].items()) or "-"
        seen = f"{time.time() - d['last_seen']:.0f}" if d["last_seen"] else "never"
        devices.add_row(d["id"], (d["backbone"] or "-")[:16], installed, seen)
    out.print(devices)
    for task, ids in sorted(status.get("drifting", {}).items()):
        out.print(f"task {task} drifting on {len(ids)} station(s): {', '.join(ids)}", highlight=False)


@hub_app.command("add-device")
def hub_add_device(
    root: RootOpt,
    device_id: Annotated[str, typer.Argument(help="The device's id (1-64 of A-Z a-z 0-9 . _ -).")],
    token_file: Annotated[Path, typer.Option("--token-file", help="Where to write the device's new token (0600); "
                                                                  "copy it to the device as --device-token-file.")],
) -> None:
    """Register a device and write its token."""
    from petah.fleet.hub import add_device

    add_device(root, device_id, token_file)
    out.print(f"device {device_id} registered; its token is in {token_file}", highlight=False, soft_wrap=True)


@hub_app.command("rotate-key")
def hub_rotate_key(
    root: RootOpt,
    root_key: Annotated[Path, typer.Option("--root-key", help="The offline root key (signs the new root).")],
    new_release_key: Annotated[Path, typer.Option("--new-release-key", help="The release key from now on.")],
) -> None:
    """Hand the targets (release) role to a new key: a new root version, signed by the root key,
    and the current targets re-signed by the new key; stations follow on their next poll."""
    from petah.fleet.metadata import rotate_targets_key

    version = rotate_targets_key(root, root_key, new_release_key)
    out.print(f"root version {version}: releases are now signed by {new_release_key}", highlight=False,
              soft_wrap=True)


def release(
    package: Annotated[Path | None, typer.Argument(help="The .petah package to release.")] = None,
    hub: HubOpt = "http://127.0.0.1:8600",
    key: Annotated[Path, typer.Option("--key", help="The release key (signs the targets metadata).")] = Path(
        "release.key"),
    stages: Annotated[str, typer.Option("--stages", help="Rollout stages, percent of devices.")] = "10,50,100",
    min_healthy: Annotated[float, typer.Option("--min-healthy", help="Share of a stage's devices that must report "
                                                                     "the release promoted before the next stage.")
                           ] = 0.9,
    max_failed: Annotated[float, typer.Option("--max-failed", help="Share of a stage's devices whose failure (gate "
                                                                   "rejection, health rollback) halts the release.")
                          ] = 0.2,
    min_score: Annotated[float | None, typer.Option("--min-score", help="Golden-set score (points) a first install "
                                                                        "must reach.")] = None,
    rollback: Annotated[int | None, typer.Option("--rollback", help="Withdraw release ID instead (stations return "
                                                                    "to their previous version).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Publish a signed release of a task package to a hub, rolled out in stages (or withdraw one)."""
    from petah.fleet.client import publish_release, withdraw_release

    if (package is None) == (rollback is None):
        raise PetahError("give a package to release, or --rollback RELEASE_ID")
    if rollback is not None:
        result = withdraw_release(rollback, hub, key)
    else:
        try:
            percents = [int(s) for s in stages.split(",") if s.strip()]
        except ValueError:
            raise PetahError(f"--stages must be whole percents like 10,50,100, got {stages!r}") from None
        if not package.is_file():
            raise PetahError(f"package not found: {package}")
        result = publish_release(package, hub, key, stages=percents, min_healthy=min_healthy,
                                 max_failed=max_failed, min_score=min_score)
    if json_out:
        emit_json(result)
        return
    out.print(" ".join(f"{k}={v}" for k, v in result.items()), highlight=False, soft_wrap=True)


COMMANDS = {"release": release}
