"""`finetune report EXPERIMENT`: accuracy against latency (and size) of an experiment's runs, Pareto front."""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402

from finetune import tracking  # noqa: E402
from finetune.config import UsageError  # noqa: E402

SKIPPED_KINDS = ("search", "report")  # parents and earlier reports carry no model of their own


@dataclass(frozen=True)
class Candidate:
    """One trained model: a tuner trial, a sweep job, a single run or a retrained best."""

    run_id: str
    name: str
    kind: str
    val_accuracy: float
    test_accuracy: float | None
    latency_ms: float
    params: float
    pareto: bool = False  # on the accuracy-vs-latency front
    pareto_with_size: bool = False  # on the accuracy-vs-latency-vs-params front


def pareto_front(points: Sequence[Sequence[float]], maximize: Sequence[bool]) -> list[bool]:
    """For each point, whether no other point is at least as good in every objective and better in one.

    Identical points do not dominate each other, so ties are all kept on the front.
    """
    signed = [[value if up else -value for value, up in zip(point, maximize)] for point in points]

    def dominates(a: list[float], b: list[float]) -> bool:
        return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))

    return [not any(dominates(other, point) for other in signed) for point in signed]


def collect(client: mlflow.MlflowClient, experiment: str) -> list[Candidate]:
    """Finished runs of the experiment that have an accuracy and a latency, with their front flags."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise UsageError(f"no MLflow experiment named {experiment} at {client.tracking_uri}")
    candidates = []
    for run in client.search_runs([found.experiment_id], filter_string="attributes.status = 'FINISHED'"):
        metrics, tags = run.data.metrics, run.data.tags
        kind = tags.get("kind", "run")
        if kind in SKIPPED_KINDS or "final_val_accuracy" not in metrics or "latency_median_ms" not in metrics:
            continue
        candidates.append(Candidate(
            run_id=run.info.run_id,
            name=run.info.run_name or run.info.run_id[:8],
            kind=kind,
            val_accuracy=metrics["final_val_accuracy"],
            test_accuracy=metrics.get("test_accuracy"),
            latency_ms=metrics["latency_median_ms"],
            params=metrics["params"],
        ))
    if not candidates:
        raise UsageError(f"experiment {experiment} has no finished run with accuracy and latency")
    front = pareto_front([(c.val_accuracy, c.latency_ms) for c in candidates], (True, False))
    front3 = pareto_front([(c.val_accuracy, c.latency_ms, c.params) for c in candidates], (True, False, False))
    flagged = [Candidate(**{**asdict(c), "pareto": f, "pareto_with_size": f3}) for c, f, f3 in zip(candidates, front, front3)]
    return sorted(flagged, key=lambda c: c.latency_ms)


def write_report(candidates: list[Candidate], out_dir: Path, title: str) -> list[Path]:
    """runs.csv and runs.md (sorted by latency) and pareto.png; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = [f.name for f in fields(Candidate)]
    with (out_dir / "runs.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(asdict(c) for c in candidates)
    lines = [
        f"# {title}: accuracy vs latency",
        "",
        "Accuracy is validation accuracy (the split every candidate was chosen on); latency is the batch-1 "
        "median of the Keras model. `front`: on the accuracy-vs-latency Pareto front; `front+size`: also "
        "counting parameters.",
        "",
        "| run | kind | val acc | test acc | latency (ms) | params (M) | front | front+size |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in candidates:
        test = f"{c.test_accuracy:.3f}" if c.test_accuracy is not None else ""
        lines.append(f"| {c.name} | {c.kind} | {c.val_accuracy:.3f} | {test} | {c.latency_ms:.2f} | "
                     f"{c.params / 1e6:.2f} | {'yes' if c.pareto else ''} | {'yes' if c.pareto_with_size else ''} |")
    (out_dir / "runs.md").write_text("\n".join(lines) + "\n")
    _plot(candidates, out_dir / "pareto.png", title)
    return [out_dir / name for name in ("runs.csv", "runs.md", "pareto.png")]


def _plot(candidates: list[Candidate], path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    sizes = [20 + 200 * c.params / max(c.params for c in candidates) for c in candidates]
    ax.scatter([c.latency_ms for c in candidates], [c.val_accuracy for c in candidates], s=sizes,
               c="lightgray", edgecolors="gray", label="runs (area ~ params)")
    front = [c for c in candidates if c.pareto]
    ax.plot([c.latency_ms for c in front], [c.val_accuracy for c in front], "o-", color="tab:red", label="Pareto front")
    for c in front:
        ax.annotate(c.name, (c.latency_ms, c.val_accuracy), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("latency, batch 1, median (ms)")
    ax.set_ylabel("validation accuracy")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(experiment: str, tracking_uri: str, out_dir: Path) -> list[Candidate]:
    """Build the report, write it, and log it to MLflow as a `report` run of the experiment."""
    client = mlflow.MlflowClient(tracking_uri)
    candidates = collect(client, experiment)
    files = write_report(candidates, out_dir, experiment)
    mlflow.set_tracking_uri(tracking_uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    with mlflow.start_run(experiment_id=experiment_id, run_name="report", tags={"kind": "report"}):
        for path in files:
            mlflow.log_artifact(str(path))
    print((out_dir / "runs.md").read_text() + f"\nWritten to {out_dir}")
    return candidates


def main(argv: list[str] | None = None) -> None:
    """Command line of `python -m finetune.report` / `finetune report`."""
    from finetune.cli import fail

    parser = argparse.ArgumentParser(prog="finetune report", description=__doc__)
    parser.add_argument("experiment", help="MLflow experiment name (mlflow.experiment of the runs)")
    parser.add_argument("--tracking-uri", default=tracking.DEFAULT_STORE)
    parser.add_argument("--out", type=Path, help="folder for runs.csv, runs.md, pareto.png "
                                                  "(default experiments/reports/EXPERIMENT)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        tracking.require_store(args.tracking_uri)
        report(args.experiment, args.tracking_uri, args.out or Path("experiments/reports") / args.experiment)
    except UsageError as error:
        fail(error)


if __name__ == "__main__":
    main()
