"""Fleet verbs: ``petah hub init | serve | status | add-device | rotate-key | pause | resume | halt``
and ``petah release`` / ``petah release-backbone``."""

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
DbOpt = Annotated[str | None, typer.Option("--db", help="The hub's tables in PostgreSQL (postgresql://USER@HOST/DB), "
                                                        "shared by several hub processes; default: ROOT/hub.db.")]
TokenOpt = Annotated[Path | None, typer.Option("--token-file", help="The hub's read (or admin) token, where it has "
                                                                    "one (petah hub serve --read-token-file).")]


@hub_app.command("init")
def hub_init(
    root: RootOpt,
    root_key: Annotated[Path, typer.Option("--root-key", help="The offline root key (NAME.key): signs root.json. "
                                                               "Keep it off the hub afterwards.")],
    release_key: Annotated[Path, typer.Option("--release-key", help="The release key (NAME.key): signs targets "
                                                                     "metadata (petah release --key).")],
    director_key: Annotated[Path | None, typer.Option(
        "--director-key", help="The director key (NAME.pub or NAME.key): signs each station's assignment; stations "
                               "then act on nothing the hub says without it. Keep its .key outside the hub's folder "
                               "(petah hub serve --director-key).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Create a hub folder: root metadata (root key), empty targets (release key), and an online
    snapshot / timestamp key kept in the folder. Prints the root.json to provision stations with."""
    from petah.fleet.metadata import init_repository

    trusted = init_repository(root, root_key, release_key, director_key)
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
    admin_token_file: Annotated[Path | None, typer.Option(
        "--admin-token-file", help="The operators' token: the page's and petah hub pause / resume / halt.")] = None,
    read_token_file: Annotated[Path | None, typer.Option(
        "--read-token-file", help="A token the fleet's status takes (device ids, versions, drift); open without.")
    ] = None,
    db: DbOpt = None,
    director_key: Annotated[Path | None, typer.Option(
        "--director-key", help="The director's private key (NAME.key), required when the hub's root names one: "
                               "signs each station's assignment.")] = None,
) -> None:
    """Serve the hub (its page at /) until SIGTERM / Ctrl-C."""
    from petah.fleet.hub_app import HUB_MAX_REQUESTS, Hub, create_hub_app
    from petah.http import listen, read_token
    from petah.http_server import serve_guarded
    from petah.serve.config import is_loopback

    if not is_loopback(host) and not (ssl_keyfile and ssl_certfile):
        raise PetahError(f"--host {host} exposes the hub beyond this machine: give --ssl-keyfile and --ssl-certfile "
                         "(device tokens must not travel in clear text)")
    if not 0 <= port <= 65535:
        raise PetahError(f"--port must be 0..65535, got {port}")
    admin_token = read_token(str(admin_token_file) if admin_token_file else None, "--admin-token-file")
    reader_token = read_token(str(read_token_file) if read_token_file else None, "--read-token-file")
    hub = Hub(root, db, director_key)
    sock = listen(host, port)
    scheme = "https" if ssl_certfile else "http"
    print(f"petah hub: {root} on {scheme}://{host}:{sock.getsockname()[1]}/", file=sys.stdout, flush=True)
    serve_guarded(create_hub_app(hub, admin_token=admin_token, read_token=reader_token), sock,
                  max_requests=HUB_MAX_REQUESTS, ssl_keyfile=ssl_keyfile, ssl_certfile=ssl_certfile)


@hub_app.command("status")
def hub_status_command(hub: HubOpt, token_file: TokenOpt = None, json_out: JsonOpt = False) -> None:
    """Each release's stage and per-stage counts, the device list, and the stations whose tasks drift."""
    from rich.table import Table

    from petah.fleet.client import hub_status
    from petah.http import read_token

    status = hub_status(hub, read_token(str(token_file) if token_file else None, "--token-file"))
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
    db: DbOpt = None,
) -> None:
    """Register a device and write its token."""
    from petah.fleet.hub import add_device

    add_device(root, device_id, token_file, db)
    out.print(f"device {device_id} registered; its token is in {token_file}", highlight=False, soft_wrap=True)


@hub_app.command("rotate-key")
def hub_rotate_key(
    root: RootOpt,
    root_key: Annotated[Path, typer.Option("--root-key", help="The offline root key (signs the new root).")],
    new_release_key: Annotated[Path | None, typer.Option("--new-release-key", help="The release key from now on."
                                                         )] = None,
    new_director_key: Annotated[Path | None, typer.Option(
        "--new-director-key", help="The director key from now on (NAME.pub or NAME.key); restart the hubs with "
                                   "its .key.")] = None,
) -> None:
    """Hand the targets (release) role or the director role to a new key (the old one revoked): a
    new root version signed by the root key (and the current targets re-signed by a new release
    key); stations follow on their next poll."""
    from petah.fleet.metadata import rotate_director_key, rotate_targets_key

    if new_release_key is None and new_director_key is None:
        raise PetahError("give --new-release-key, --new-director-key or both")
    if new_release_key is not None:
        version = rotate_targets_key(root, root_key, new_release_key)
        out.print(f"root version {version}: releases are now signed by {new_release_key}", highlight=False,
                  soft_wrap=True)
    if new_director_key is not None:
        version = rotate_director_key(root, root_key, new_director_key)
        out.print(f"root version {version}: assignments are now signed by {new_director_key}; restart each hub "
                  f"with --director-key of its .key", highlight=False, soft_wrap=True)


def _operate(action: str, release_id: int, hub: str, admin_token_file: Path, json_out: bool) -> None:
    from petah.fleet.client import operate_release
    from petah.http import read_token

    result = operate_release(release_id, action, hub, read_token(str(admin_token_file), "--admin-token-file"))
    if json_out:
        emit_json(result)
        return
    out.print(f"release {result['release']} is {result['state']}", highlight=False)


ReleaseArg = Annotated[int, typer.Argument(help="The release id (petah hub status).")]
AdminOpt = Annotated[Path, typer.Option("--admin-token-file", help="The hub's admin token (the operators').")]


@hub_app.command("pause")
def hub_pause(release_id: ReleaseArg, admin_token_file: AdminOpt, hub: HubOpt = "http://127.0.0.1:8600",
              json_out: JsonOpt = False) -> None:
    """Pause a rolling release: no stage advances; stations keep what they run."""
    _operate("pause", release_id, hub, admin_token_file, json_out)


@hub_app.command("resume")
def hub_resume(release_id: ReleaseArg, admin_token_file: AdminOpt, hub: HubOpt = "http://127.0.0.1:8600",
               json_out: JsonOpt = False) -> None:
    """Resume a paused or halted release: its rollout goes on from its stage."""
    _operate("resume", release_id, hub, admin_token_file, json_out)


@hub_app.command("halt")
def hub_halt(release_id: ReleaseArg, admin_token_file: AdminOpt, hub: HubOpt = "http://127.0.0.1:8600",
             json_out: JsonOpt = False) -> None:
    """Roll back a release: halted, its stations return to their previous version (resume undoes it;
    withdrawing it for good takes the release key: petah release --rollback)."""
    _operate("halt", release_id, hub, admin_token_file, json_out)


KeyOpt = Annotated[Path, typer.Option("--key", help="The release key (signs the targets metadata).")]
StagesOpt = Annotated[str, typer.Option("--stages", help="Rollout stages, percent of devices.")]
MinHealthyOpt = Annotated[float, typer.Option("--min-healthy", help="Share of a stage's devices that must report the "
                                                                    "release promoted before the next stage.")]


def stage_percents(stages: str) -> list[int]:
    try:
        return [int(s) for s in stages.split(",") if s.strip()]
    except ValueError:
        raise PetahError(f"--stages must be whole percents like 10,50,100, got {stages!r}") from None


def print_result(result: dict, json_out: bool) -> None:
    if json_out:
        emit_json(result)
        return
    out.print(" ".join(f"{k}={v}" for k, v in result.items()), highlight=False, soft_wrap=True)


def release(
    package: Annotated[Path | None, typer.Argument(help="The .petah package to release.")] = None,
    hub: HubOpt = "http://127.0.0.1:8600",
    key: KeyOpt = Path("release.key"),
    stages: StagesOpt = "10,50,100",
    min_healthy: MinHealthyOpt = 0.9,
    max_failed: Annotated[float, typer.Option("--max-failed", help="Share of a stage's devices whose failure (gate "
                                                                   "rejection, health rollback) halts the release.")
                          ] = 0.2,
    min_score: Annotated[float | None, typer.Option("--min-score", help="Golden-set score (points) a first install "
                                                                        "must reach.")] = None,
    rollback: Annotated[int | None, typer.Option("--rollback", help="Withdraw release ID instead (stations return "
                                                                    "to their previous version).")] = None,
    token_file: TokenOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Publish a signed release of a task package to a hub, rolled out in stages (or withdraw one)."""
    from petah.fleet.client import publish_release, withdraw_release

    if (package is None) == (rollback is None):
        raise PetahError("give a package to release, or --rollback RELEASE_ID")
    if rollback is not None:
        from petah.http import read_token

        result = withdraw_release(rollback, hub, key, read_token(str(token_file) if token_file else None,
                                                                 "--token-file"))
    else:
        percents = stage_percents(stages)
        if not package.is_file():
            raise PetahError(f"package not found: {package}")
        result = publish_release(package, hub, key, stages=percents, min_healthy=min_healthy,
                                 max_failed=max_failed, min_score=min_score)
    print_result(result, json_out)


def release_backbone(
    folder: Annotated[Path, typer.Argument(help="The new backbone's device folder (petah export --device).")],
    package: Annotated[list[Path], typer.Option(
        "--package", "-p", help="A package adapted on the new backbone; give every task the stations serve.")],
    replaces: Annotated[str, typer.Option(
        "--replaces", help="The backbone the stations run now: its fingerprint or its device folder.")],
    hub: HubOpt = "http://127.0.0.1:8600",
    key: KeyOpt = Path("release.key"),
    stages: StagesOpt = "10,50,100",
    min_healthy: MinHealthyOpt = 0.9,
    max_failed: Annotated[float, typer.Option("--max-failed", help="Share of a stage's devices whose failure halts "
                                                                   "the release (they move back).")] = 0.2,
    json_out: JsonOpt = False,
) -> None:
    """Publish a new backbone and every task re-adapted on it as one release: stations move to the
    pair together (each task gated against the pair it runs, then a health window) and move back
    together when it fails, is halted or withdrawn (petah release --rollback ID)."""
    from petah.fleet.client import publish_backbone

    percents = stage_percents(stages)
    for path in package:
        if not path.is_file():
            raise PetahError(f"package not found: {path}")
    result = publish_backbone(folder, package, replaces, hub, key, stages=percents, min_healthy=min_healthy,
                              max_failed=max_failed)
    print_result(result, json_out)


COMMANDS = {"release": release, "release-backbone": release_backbone}
