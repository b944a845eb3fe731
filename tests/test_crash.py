"""A few kill -9 rounds under concurrent load (the long run with 100+ kills is bench/crash_harness.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.crash_harness import run


@pytest.mark.parametrize("mode", ["sync", "hybrid"])
def test_no_acknowledged_turn_is_lost_across_kill_9(tmp_path: Path, mode: str) -> None:
    report = run(kills=3, mode=mode, clients=3, directory=tmp_path)
    assert report.kills == 3 and report.acknowledged > 10
    assert report.critical_acknowledged > 0
    assert report.lost_critical == [], report
    assert report.lost_routine_outside_window == [], report
    assert report.duplicates == [] and report.interleaved == [], report
