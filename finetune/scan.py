"""`finetune scan key=value ...`: scan and split the configured data exactly as a run does, and report it.

Prints the class counts, the split sizes and every skipped file with its reason; trains nothing and writes
nothing into experiments/ (the scan results go to data.cache_dir, as a run's do). A data error is one line,
exit 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from typing import Any

from omegaconf import DictConfig, open_dict

from finetune.config import UsageError, compose, validate


def main(argv: list[str] | None = None) -> None:
    """Check the config, then scan and split its data and print what a run would train on."""
    from finetune.cli import fail

    parser = argparse.ArgumentParser(prog="finetune scan", description=__doc__)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data=folder data.path=/my/images")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = _checked_config(args.overrides)
        from finetune.run import scan_and_split

        started = time.perf_counter()
        data = scan_and_split(cfg)
    except UsageError as error:
        fail(error)
    print(report(data, cfg, time.perf_counter() - started))


def _checked_config(overrides: list[str]) -> DictConfig:
    """The composed, validated config (Hydra's `${hydra:runtime.cwd}` resolves, as in a run)."""
    cfg = compose(overrides, hydra_node=True)
    with open_dict(cfg):
        del cfg["hydra"]
    validate(cfg)
    return cfg


def report(data: Any, cfg: DictConfig, seconds: float) -> str:
    """Classes with their image counts, split sizes, and the skipped files with the reason."""
    from finetune.dataset import SPLITS

    folder = data.folder
    counts = Counter(folder.labels)
    width = max(len(name) for name in folder.class_names)
    lines = [
        f"{folder.source.location}: {len(folder.paths)} usable images in {len(folder.class_names)} classes, "
        f"{len(folder.skipped)} skipped (scanned in {seconds:.1f} s)",
        *(f"  {name:<{width}}  {counts.get(label, 0)}" for label, name in enumerate(folder.class_names)),
        f"Splits (data.split_seed={cfg.data.split_seed}): "
        + ", ".join(f"{name} {len(data.splits[name].paths)}" for name in SPLITS)
        + f"; fingerprint {data.info['fingerprint']}",
    ]
    if folder.skipped:
        lines.append(f"Skipped {len(folder.skipped)} file(s):")
        lines.extend(f"  {path}\t{reason}" for path, reason in folder.skipped)
    return "\n".join(lines)


if __name__ == "__main__":
    from finetune import quiet

    quiet.import_tensorflow()
    main()
