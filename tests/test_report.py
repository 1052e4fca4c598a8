"""The Pareto front on hand-made points (ties included) and the report files."""

from __future__ import annotations

from pathlib import Path

from finetune.report import Candidate, pareto_front, write_report

MAX_ACC_MIN_LATENCY = (True, False)


def test_dominated_points_are_off_the_front() -> None:
    points = [(0.90, 10.0), (0.80, 5.0), (0.85, 12.0), (0.70, 6.0), (0.95, 30.0)]
    # (0.85, 12) is beaten by (0.90, 10); (0.70, 6) by (0.80, 5)
    assert pareto_front(points, MAX_ACC_MIN_LATENCY) == [True, True, False, False, True]


def test_ties_stay_on_the_front_together() -> None:
    points = [(0.9, 10.0), (0.9, 10.0), (0.9, 12.0), (0.8, 10.0)]
    # identical points do not dominate each other; equal accuracy but slower, or equal latency but less accurate, is dominated
    assert pareto_front(points, MAX_ACC_MIN_LATENCY) == [True, True, False, False]


def test_size_as_a_third_objective_can_put_a_point_back_on_the_front() -> None:
    points = [(0.9, 10.0, 5.0), (0.85, 12.0, 1.0)]
    assert pareto_front([p[:2] for p in points], MAX_ACC_MIN_LATENCY) == [True, False]
    assert pareto_front(points, (True, False, False)) == [True, True]


def test_single_point_and_empty_input() -> None:
    assert pareto_front([(0.5, 1.0)], MAX_ACC_MIN_LATENCY) == [True]
    assert pareto_front([], MAX_ACC_MIN_LATENCY) == []


def test_report_files(tmp_path: Path) -> None:
    candidates = [
        Candidate("a", "fast", "trial", 0.8, None, 2.0, 1e6, True, True),
        Candidate("b", "slow", "run", 0.9, 0.88, 9.0, 3e6, True, True),
        Candidate("c", "worse", "trial", 0.7, None, 9.5, 3e6, False, False),
    ]
    files = write_report(candidates, tmp_path, "exp")
    assert [f.name for f in files] == ["runs.csv", "runs.md", "pareto.png"]
    rows = (tmp_path / "runs.csv").read_text().splitlines()
    assert rows[0].startswith("run_id,name,kind,val_accuracy") and len(rows) == 4
    table = (tmp_path / "runs.md").read_text()
    assert "| slow | run | 0.900 | 0.880 | 9.00 | 3.00 | yes | yes |" in table
    assert (tmp_path / "pareto.png").stat().st_size > 1000
