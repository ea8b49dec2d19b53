"""The hub for its operators: pause / resume / roll back (the registry's rules, the API behind the
admin token, the CLI), the status behind a read token, and the hub's page in a real browser
(Debian's Chromium through Playwright) showing releases, why stations refused them, the stations
and their drift, with working buttons."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import chromium_page, chromium_path, one_json, petah_process
from petah.bench.fleet import wait_for
from petah.errors import PetahError
from petah.fleet.client import call, hub_status, operate_release, sign_release
from petah.fleet.hub import Hub
from petah.fleet.hub_app import running_hub
from petah.fleet.metadata import init_repository
from petah.packages import generate_keypair, read_package
from petah.serve import demo_packages

ADMIN = "hub-admin-token-0123456789abcdef"
READ = "hub-read-token-0123456789abcdef"
PACKAGES = {p.stem: Path(p) for p in demo_packages()}


@pytest.fixture
def fleet(tmp_path):
    """A hub with one release of digits (stages 50 %, 100 %) and three stations: two in its first
    stage, one of which refused it at its gate; line-3 reports its digits drifting."""
    for name in ("root", "release"):
        generate_keypair(tmp_path / name)
    root = tmp_path / "hub"
    init_repository(root, tmp_path / "root.key", tmp_path / "release.key")
    hub = Hub(root)
    data, targets = sign_release(PACKAGES["digits"], hub.repository.current_targets(), tmp_path / "release.key")
    release = hub.publish(data, targets, {"stages": [50, 100], "min_healthy": 0.5, "max_failed": 1.0})["release"]
    backbone = read_package(PACKAGES["digits"]).manifest.backbone.fingerprint
    devices = ("line-1", "line-2", "line-3")
    for device in devices:
        hub.registry.add_device(device, f"{device}-token-0123456789abcdef")
        hub.registry.poll(device, backbone, {}, "ok")
    members = [d for d in devices if hub.registry.poll(d, backbone, {}, "ok")["desired"]]  # the first stage: 2
    hub.registry.poll("line-3", backbone, {}, "ok", {"digits": {"state": "drifting", "estimated": 71.5}})
    hub.registry.report(members[0], "gate_rejected", release, "digits", "accuracy 41.0 < 90.0")
    return {"hub": hub, "release": release, "backbone": backbone, "member": members[0], "other": members[1],
            "root": root}


def test_operators_pause_resume_and_roll_back_by_the_rules(fleet):
    registry, release, backbone = fleet["hub"].registry, fleet["release"], fleet["backbone"]
    member = fleet["member"]
    assert registry.operate(release, "pause") == "paused"
    registry.report(fleet["other"], "promoted", release, "digits", "")  # would advance a rolling release
    assert registry.release(release).stage == 0  # paused: no stage advances
    assert "digits" in registry.poll(fleet["other"], backbone, {}, "ok")["desired"]  # and its stations keep it
    with pytest.raises(PetahError, match="only a release that is rolling can pause"):
        registry.operate(release, "pause")
    assert registry.operate(release, "resume") == "rolling"
    assert registry.release(release).stage == 1  # resumed: the promotion it waited on counts
    assert registry.operate(release, "halt") == "halted"
    registry.report(member, "gate_rejected", release, "digits", "again")
    assert registry.operate(release, "resume") == "rolling"  # the failures were judged: they no longer halt it
    assert registry.operate(release, "halt") == "halted"
    polled = registry.poll(member, backbone, {"digits": "x"}, "ok")
    assert polled["desired"] == {} and polled["withdrawn"]["digits"] == [registry.release(release).sha256]
    registry.set_state(release, "withdrawn")
    with pytest.raises(PetahError, match="withdrawn: only a release that is halted or paused can resume"):
        registry.operate(release, "resume")  # only the release key brings a withdrawn release back
    with pytest.raises(PetahError, match="unknown action"):
        registry.operate(release, "delete")


def test_the_status_takes_a_read_token_and_actions_the_admin_token(fleet):
    with running_hub(fleet["hub"], admin_token=ADMIN, read_token=READ) as (url, _server):
        with pytest.raises(PetahError, match="HTTP 401: wrong or missing read bearer token"):
            hub_status(url)
        status = hub_status(url, READ)
        assert hub_status(url, ADMIN) == status
        assert "token" not in json.dumps(status["devices"])  # device tokens (or their hashes) never listed
        failures = status["releases"][0]["failures"]
        assert [(f["device"], f["event"], f["detail"]) for f in failures] == [
            (fleet["member"], "gate_rejected", "accuracy 41.0 < 90.0")]
        with pytest.raises(PetahError, match="HTTP 401: wrong or missing admin bearer token"):
            operate_release(fleet["release"], "pause", url, READ)
        with pytest.raises(PetahError, match="HTTP 404: no release 99"):
            operate_release(99, "pause", url, ADMIN)
        with pytest.raises(PetahError, match="HTTP 404: no action 'explode'"):
            call(f"{url}/v1/releases/{fleet['release']}/explode", "POST", b"", {"Authorization": f"Bearer {ADMIN}"})
        (Path(fleet["root"]).parent / "admin.token").write_text(ADMIN + "\n")
        paused = one_json(petah_process("hub", "pause", fleet["release"], "--hub", url, "--admin-token-file",
                                        Path(fleet["root"]).parent / "admin.token", "--json"))
        assert paused == {"release": fleet["release"], "state": "paused"}
        again = petah_process("hub", "pause", fleet["release"], "--hub", url, "--admin-token-file",
                              Path(fleet["root"]).parent / "admin.token", ok=False)
        assert again.returncode != 0 and "HTTP 409: release 1 is paused" in again.stderr
    with running_hub(fleet["hub"], admin_token=ADMIN) as (url, _server):
        assert hub_status(url)["releases"][0]["state"] == "paused"  # no read token: open, as before
        poll = {"backbone": "x", "drift": {"digits": {"state": "drift\u0000ing", "estimated": float("nan")}},
                "installed": {"digits": "a\u0000b"}}
        call(f"{url}/v1/devices/line-1/poll", "POST", json.dumps(poll).encode(),
             {"Authorization": "Bearer line-1-token-0123456789abcdef"})
        line1 = next(d for d in hub_status(url)["devices"] if d["id"] == "line-1")  # NaN left out: still JSON
        assert line1["drift"] == {"digits": {"state": "drifting"}} and line1["installed"] == {"digits": "ab"}
    with running_hub(fleet["hub"]) as (url, _server):
        with pytest.raises(PetahError, match="HTTP 403: operator actions are disabled"):
            operate_release(fleet["release"], "resume", url, ADMIN)


@pytest.mark.browser
def test_the_hub_page_shows_the_rollout_and_its_buttons_work(fleet):
    if chromium_path() is None:
        pytest.skip("no Chromium (apt-get install -y chromium, or PETAH_CHROMIUM)")
    registry, release = fleet["hub"].registry, fleet["release"]
    with running_hub(fleet["hub"], admin_token=ADMIN, read_token=READ) as (url, _server), chromium_page() as page:
        page.goto(url + "/")
        page.locator("#token-box").wait_for()  # the status needs a token: the page asks for one
        page.fill("#token", ADMIN)
        page.click("#token-save")
        row = page.locator(f"#releases tr[data-release='{release}']")
        row.wait_for()
        assert row.get_attribute("data-state") == "rolling"
        assert "50 % (stage 1 of 2)" in row.text_content()
        why = page.locator(f"#releases tr[data-failures='{release}']").text_content()
        assert f"{fleet['member']}: gate_rejected (accuracy 41.0 < 90.0)" in why
        drifting = page.locator("#stations tr[data-station='line-3']").text_content()
        assert "drifting: digits (est. 71.5)" in drifting
        assert page.locator("#c-drifting").text_content() == "1"
        for action, state in (("pause", "paused"), ("resume", "rolling"), ("halt", "halted")):
            page.click(f"#releases button[data-release='{release}'][data-action='{action}']")
            page.locator(f"#releases tr[data-release='{release}'][data-state='{state}']").wait_for()
            assert registry.release(release).state == state
        assert page.locator(f"#releases button[data-release='{release}']").all_text_contents() == ["Resume"]
        history = page.locator(f"#releases tr[data-history='{release}']").text_content()
        assert "paused (operator: pause)" in history and "halted (operator: halt)" in history
        assert wait_for(lambda: page.locator("#error").text_content() == "", 5)


def test_the_stage_order_follows_a_device_that_changes_backbone(tmp_path):
    """One device leaves a backbone and another joins it (the count unchanged): the order is the
    new set's, on every registry sharing the database."""
    from petah.fleet.registry import Registry, stage_rank

    first, second = Registry(tmp_path / "hub.db"), Registry(tmp_path / "hub.db")
    try:
        for device in ("a", "b", "c"):
            first.add_device(device, f"{device}-token-0123456789abcdef")
            first.poll(device, "X", {}, "ok")
        release = first.add_release("t", "X", "s" * 64, "t/s.petah", 1, [100], 1.0, 1.0, None)
        assert sorted(first._stage_members(release, 0)) == ["a", "b", "c"]
        second.poll("a", "Y", {}, "ok")  # another hub process sees a move to another backbone
        first.add_device("d", "d-token-0123456789abcdef")
        second.poll("d", "X", {}, "ok")
        for registry in (first, second):
            assert sorted(registry._stage_members(release, 0), key=stage_rank) == sorted("bcd", key=stage_rank)
        # paused: stations that run it keep it, none that has not taken it starts
        assert "t" in first.poll("b", "X", {"t": "s" * 64}, "ok")["desired"]
        first.operate(release.id, "pause")
        assert "t" in first.poll("b", "X", {"t": "s" * 64}, "ok")["desired"]
        assert first.poll("c", "X", {}, "ok")["desired"] == {}
    finally:
        first.close()
        second.close()
