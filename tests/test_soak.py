"""A short soak (bounded: about 50 s): a real station under steady load with hot swaps, rollbacks,
hub releases and withdrawals, capture on and a kill -9 + restart; nothing fails while it is up,
nothing leaks descriptors, the restart is quick. ``petah bench soak`` runs the long version."""

import pytest

from petah.bench.soak import run_soak, slope_per_hour

pytestmark = [pytest.mark.slow, pytest.mark.server]


def test_a_station_under_load_swaps_restarts_and_keeps_flat():
    result = run_soak(minutes=0.4, restart_minutes=0.35, restart_s=10, clients=2, swap_s=3, sample_s=2,
                      request_interval_s=0.02, release_s=8)
    counts = result["counts"]
    assert counts["failed"] == 0 and counts["admin_failed"] == 0, counts
    assert counts["requests"] > 100 and counts["swaps"] >= 2 and counts["rollbacks"] >= 2, counts
    assert counts["release_steps"] >= 3 and counts["release_steps_followed"] >= 2, counts
    assert len(result["restart_seconds"]) >= 1 and max(result["restart_seconds"]) < 20
    low, high = result["fds"]
    assert high - low <= 4, result["fds"]  # swaps and captures close what they open
    assert result["end"]["capture_bytes"] <= 32 * 2**20 and result["pss_mb"][1] > 50
    assert [s["phase"] for s in result["samples"]].count(2) >= 3


def test_the_slope_and_its_interval_are_a_least_squares_fit():
    times = [0, 600, 1200, 1800, 2400, 3000]
    fitted = slope_per_hour(times, [100 + 2 * t / 3600 for t in times])
    assert fitted["per_hour"] == pytest.approx(2.0) and fitted["low"] == pytest.approx(2.0)
    noisy = slope_per_hour(times, [100, 101, 99, 100, 102, 100])
    assert noisy["low"] < 0 < noisy["high"]  # no growth told apart from the noise
    assert slope_per_hour([0, 1], [1, 2])["per_hour"] is None  # two points fit anything
