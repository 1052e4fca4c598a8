"""`finetune report EXPERIMENT`: accuracy against latency (and size) of an experiment's runs, a Pareto front per data split."""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from mlflow.entities import Run  # noqa: E402
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID  # noqa: E402

from finetune import tracking  # noqa: E402
from finetune.config import UsageError  # noqa: E402

SKIPPED_KINDS = ("search", "report")  # parents and earlier reports carry no model of their own
PAGE_SIZE = 1000  # runs per search request; every page is read
FINGERPRINT_PARAM = "data.fingerprint"  # the split fingerprint a job logs with its data params
UNKNOWN_DATA = "unknown data"
TIMING_TAG = "latency.method"  # what latency_median_ms timed, set with it (finetune.run.latency_tags)
LEGACY_TIMING = ("keras model, tf.function", "latency.measured_threads")  # before latency.format: method, threads tag
UNKNOWN_TIMING = "not recorded"


@dataclass(frozen=True)
class Candidate:
    """One trained model: a tuner trial, a sweep job, a single run or a retrained best."""

    run_id: str
    name: str
    kind: str
    fingerprint: str  # of the data split it was trained and validated on; "" when none was recorded
    data_name: str
    data_root: str
    val_accuracy: float
    test_accuracy: float | None
    latency_ms: float
    params: float
    timing: str  # what latency_ms timed: "tflite_float32, LiteRT XNNPACK, 1 thread"
    number: int = 0  # its number within its data split, by latency: the plot's label
    pareto: bool = False  # on the accuracy-vs-latency front of its data split
    pareto_with_size: bool = False  # on the accuracy-vs-latency-vs-params front of its data split


@dataclass(frozen=True)
class SplitGroup:
    """The candidates of one data split (one fingerprint): only these are compared with each other."""

    fingerprint: str  # "" for the candidates that recorded no split
    candidates: list[Candidate]  # sorted by latency, numbered, with their front flags

    @property
    def data_names(self) -> str:
        return ", ".join(sorted({c.data_name for c in self.candidates}))

    @property
    def title(self) -> str:
        return f"{self.data_names} (split {self.fingerprint})" if self.fingerprint else UNKNOWN_DATA

    @property
    def timings(self) -> list[tuple[str, int]]:
        """How the latencies were measured, and how many runs each way (most first)."""
        return Counter(c.timing for c in self.candidates).most_common()


def pareto_front(points: Sequence[Sequence[float]], maximize: Sequence[bool]) -> list[bool]:
    """For each point, whether no other point is at least as good in every objective and better in one.

    Identical points do not dominate each other, so ties are all kept on the front.
    """
    signed = [[value if up else -value for value, up in zip(point, maximize)] for point in points]

    def dominates(a: list[float], b: list[float]) -> bool:
        return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))

    return [not any(dominates(other, point) for other in signed) for point in signed]


def all_runs(client: mlflow.MlflowClient, experiment_id: str) -> list[Run]:
    """Every run of the experiment, whatever its status, page after page."""
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs([experiment_id], max_results=PAGE_SIZE, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def data_params(run: Run, runs_by_id: dict[str, Run]) -> dict[str, str]:
    """The `data.*` params (without the prefix) of the run, or of its nearest parent run that recorded a split.

    A tuner trial logs no data of its own: its search (the parent run) does. Empty when no run in the line did.
    """
    while FINGERPRINT_PARAM not in run.data.params:
        parent = runs_by_id.get(run.data.tags.get(MLFLOW_PARENT_RUN_ID, ""))
        if parent is None:
            return {}
        run = parent
    return {key.removeprefix("data."): value for key, value in run.data.params.items() if key.startswith("data.")}


def timing_of(run: Run) -> str:
    """What the run's latency_median_ms timed (its TIMING_TAG), or that it did not say."""
    method = run.data.tags.get(TIMING_TAG, UNKNOWN_TIMING)
    legacy_method, legacy_threads = LEGACY_TIMING
    if method == legacy_method and legacy_threads in run.data.tags:
        return f"{method}, {run.data.tags[legacy_threads]} threads"
    return method


def candidates_of(runs: list[Run]) -> list[Candidate]:
    """The finished runs that trained a model and have an accuracy and a latency."""
    runs_by_id = {run.info.run_id: run for run in runs}
    candidates = []
    for run in runs:
        metrics, kind = run.data.metrics, run.data.tags.get("kind", "run")
        if (run.info.status != "FINISHED" or kind in SKIPPED_KINDS
                or "final_val_accuracy" not in metrics or "latency_median_ms" not in metrics):
            continue
        data = data_params(run, runs_by_id)
        candidates.append(Candidate(
            run_id=run.info.run_id,
            name=run.info.run_name or run.info.run_id[:8],
            kind=kind,
            fingerprint=data.get("fingerprint", ""),
            data_name=data.get("name", ""),
            data_root=data.get("root", ""),
            val_accuracy=metrics["final_val_accuracy"],
            test_accuracy=metrics.get("test_accuracy"),
            latency_ms=metrics["latency_median_ms"],
            params=metrics["params"],
            timing=timing_of(run),
        ))
    return candidates


def rank(candidates: list[Candidate]) -> list[Candidate]:
    """The candidates of one split, sorted by latency, numbered from 1, with their front flags."""
    front = pareto_front([(c.val_accuracy, c.latency_ms) for c in candidates], (True, False))
    front3 = pareto_front([(c.val_accuracy, c.latency_ms, c.params) for c in candidates], (True, False, False))
    flagged = [replace(c, pareto=f, pareto_with_size=f3) for c, f, f3 in zip(candidates, front, front3)]
    by_latency = sorted(flagged, key=lambda c: c.latency_ms)
    return [replace(c, number=number) for number, c in enumerate(by_latency, start=1)]


def group_by_split(candidates: list[Candidate]) -> list[SplitGroup]:
    """One group per split fingerprint (by data name), the candidates without one last."""
    fingerprints = {c.fingerprint: c.data_name for c in candidates}
    ordered = sorted(fingerprints, key=lambda fp: (not fp, fingerprints[fp], fp))
    return [SplitGroup(fp, rank([c for c in candidates if c.fingerprint == fp])) for fp in ordered]


def select(groups: list[SplitGroup], fingerprint: str) -> SplitGroup:
    """The group of this split fingerprint; a UsageError naming the experiment's splits if there is none."""
    for group in groups:
        if group.fingerprint and group.fingerprint == fingerprint:
            return group
    known = ", ".join(group.title for group in groups if group.fingerprint) or "none"
    raise UsageError(f"no finished run on the data split {fingerprint}; the experiment's splits: {known}")


def collect(client: mlflow.MlflowClient, experiment: str, fingerprint: str | None = None) -> list[SplitGroup]:
    """The experiment's candidates, grouped by data split (only the given split, if one is given)."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise UsageError(f"no MLflow experiment named {experiment} at {client.tracking_uri}")
    candidates = candidates_of(all_runs(client, found.experiment_id))
    if not candidates:
        raise UsageError(f"experiment {experiment} has no finished run with accuracy and latency")
    groups = group_by_split(candidates)
    return groups if fingerprint is None else [select(groups, fingerprint)]


def write_report(groups: list[SplitGroup], out_dir: Path, title: str) -> list[Path]:
    """runs.csv, runs.md (a section per data split, sorted by latency) and pareto.png; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "runs.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[f.name for f in fields(Candidate)])
        writer.writeheader()
        writer.writerows(asdict(c) for group in groups for c in group.candidates)
    lines = [
        f"# {title}: accuracy vs latency",
        "",
        "Runs are grouped by the data split they were trained and validated on (its fingerprint): each split "
        "has its own Pareto front, and accuracies of different splits are not compared. Accuracy is validation "
        "accuracy (the split every candidate was chosen on); latency is the batch-1 median of each run's headline "
        "artifact (`latency.format`), timed as its section says. "
        "`#`: the point's label on the plot; `front`: on the accuracy-vs-latency Pareto front of its split; "
        "`front+size`: also counting parameters.",
    ]
    for group in groups:
        lines += ["", *_section(group)]
    (out_dir / "runs.md").write_text("\n".join(lines) + "\n")
    figure = draw(groups, title)
    figure.savefig(out_dir / "pareto.png", dpi=100)
    plt.close(figure)
    return [out_dir / name for name in ("runs.csv", "runs.md", "pareto.png")]


def _run_count(count: int) -> str:
    return f"{count} run{'s' if count != 1 else ''}"


def _section(group: SplitGroup) -> list[str]:
    """The Markdown section of one data split: what data it is, then its table."""
    count = _run_count(len(group.candidates))
    if group.fingerprint:
        roots = ", ".join(sorted({f"`{c.data_root}`" for c in group.candidates}))
        about = f"Data `{group.data_names}` at {roots}, split fingerprint `{group.fingerprint}`: {count}."
    else:
        about = (f"{count} that recorded no data split (neither the run nor a parent run logged "
                 f"`{FINGERPRINT_PARAM}`): they may come from different data and are compared only with each other.")
    lines = [f"## {group.title}", "", about, "", _timing_line(group), "",
             "| # | run | kind | val acc | test acc | latency (ms) | params (M) | front | front+size |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in group.candidates:
        test = f"{c.test_accuracy:.3f}" if c.test_accuracy is not None else ""
        lines.append(f"| {c.number} | {c.name} | {c.kind} | {c.val_accuracy:.3f} | {test} | {c.latency_ms:.2f} | "
                     f"{c.params / 1e6:.2f} | {'yes' if c.pareto else ''} | {'yes' if c.pareto_with_size else ''} |")
    return lines


def _timing_line(group: SplitGroup) -> str:
    """How the group's latencies were measured; a warning when not all the same way."""
    timings = group.timings
    if len(timings) == 1:
        return f"Latency: {timings[0][0]}."
    ways = "; ".join(f"{_run_count(count)}: {timing}" for timing, count in timings)
    return (f"**Latency was measured in {len(timings)} different ways here** ({ways}): latencies of different "
            "ways do not compare, and the front mixes them.")


def axis_label(group: SplitGroup) -> str:
    """The plot's latency axis: what was timed, or that the runs were timed differently."""
    timings = group.timings
    what = timings[0][0] if len(timings) == 1 else "timed in different ways (runs.md)"
    return f"latency, batch 1, median (ms): {what}"


def draw(groups: list[SplitGroup], title: str) -> Figure:
    """One panel per data split: its runs (area ~ params) and its front, every point labelled."""
    columns = min(2, len(groups))
    rows = math.ceil(len(groups) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(8 * columns, 5 * rows), squeeze=False)
    for ax, group in zip(axes.flat, groups):
        _draw_split(ax, group)
    for ax in axes.flat[len(groups):]:
        figure.delaxes(ax)
    figure.suptitle(f"{title}: one Pareto front per data split")
    figure.tight_layout()
    return figure


def _draw_split(ax: Axes, group: SplitGroup) -> None:
    """Front points carry their number and run name, the others their number (runs.md names them)."""
    candidates = group.candidates
    largest = max(c.params for c in candidates)
    ax.scatter([c.latency_ms for c in candidates], [c.val_accuracy for c in candidates],
               s=[20 + 200 * c.params / largest for c in candidates], c="lightgray", edgecolors="gray",
               label="runs (area ~ params)")
    front = [c for c in candidates if c.pareto]
    ax.plot([c.latency_ms for c in front], [c.val_accuracy for c in front], "o-", color="tab:red", label="Pareto front")
    for c in candidates:
        if c.pareto:
            ax.annotate(f"{c.number} {c.name}", (c.latency_ms, c.val_accuracy), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
        else:
            ax.annotate(str(c.number), (c.latency_ms, c.val_accuracy), textcoords="offset points",
                        xytext=(4, -10), fontsize=7, color="dimgray")
    ax.set_xlabel(axis_label(group))
    ax.set_ylabel("validation accuracy")
    ax.set_title(f"{group.title}: {_run_count(len(candidates))}", fontsize=10)
    ax.legend(loc="best", fontsize=8)


def log_report(client: mlflow.MlflowClient, experiment_id: str, files: list[Path], tags: dict[str, str]) -> None:
    """Log the files as a `report` run of the experiment (FAILED if an upload fails)."""
    run_id = client.create_run(experiment_id, run_name="report", tags={**tags, "kind": "report"}).info.run_id
    try:
        for path in files:
            client.log_artifact(run_id, str(path))
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id)


def report(experiment: str, tracking_uri: str, out_dir: Path, fingerprint: str | None = None) -> list[SplitGroup]:
    """Build the report (of one data split, if given), write it, and log it to MLflow as a `report` run."""
    client = mlflow.MlflowClient(tracking_uri)
    groups = collect(client, experiment, fingerprint)
    files = write_report(groups, out_dir, experiment)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    log_report(client, experiment_id, files, {"fingerprint": fingerprint} if fingerprint else {})
    print((out_dir / "runs.md").read_text() + f"\nWritten to {out_dir}")
    return groups


def main(argv: list[str] | None = None) -> None:
    """Command line of `python -m finetune.report` / `finetune report`."""
    from finetune.cli import fail

    parser = argparse.ArgumentParser(prog="finetune report", description=__doc__)
    parser.add_argument("experiment", help="MLflow experiment name (mlflow.experiment of the runs)")
    parser.add_argument("--tracking-uri", default=tracking.DEFAULT_STORE)
    parser.add_argument("--fingerprint", metavar="FP", help="report only the runs on this data split "
                                                            "(its fingerprint, as runs.md lists it)")
    parser.add_argument("--out", type=Path, help="folder for runs.csv, runs.md, pareto.png (default "
                                                  "experiments/reports/EXPERIMENT, with --fingerprint .../EXPERIMENT/FP)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    out_dir = args.out or Path("experiments/reports", args.experiment, args.fingerprint or "")
    try:
        tracking.require_store(args.tracking_uri)
        report(args.experiment, args.tracking_uri, out_dir, args.fingerprint)
    except UsageError as error:
        fail(error)


if __name__ == "__main__":
    main()
