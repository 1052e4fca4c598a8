"""Command line: `finetune key=value ...` (Hydra overrides) and `finetune summary|export|predict|report ...`.

Config errors exit 2 with one line.
"""

from __future__ import annotations

import importlib
import shutil
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from finetune import interrupts
from finetune.artifacts import ExportError
from finetune.config import CONF_DIR, UsageError, compose, validate

SUBCOMMANDS = {
    "summary": "finetune.summary",
    "export": "finetune.export",
    "predict": "finetune.predict",
    "report": "finetune.report",
}
USAGE_EXIT = 2
INTERRUPT_EXIT = 130
failed_jobs: list[str] = []  # multirun jobs stopped by a config error; the sweep exits 2 after the others ran


def fail(error: UsageError) -> None:
    """Print the one-line reason and exit with status 2."""
    print(f"finetune: error: {error}", file=sys.stderr)
    sys.exit(USAGE_EXIT)


def main(argv: list[str] | None = None) -> None:
    """Dispatch `summary`, check the config before Hydra writes anything, then run the Hydra app."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SUBCOMMANDS:
        importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:])
        return
    if not any(arg.startswith("-") for arg in argv):  # Hydra's own flags (--cfg, -m, --help) go straight through
        try:
            validate(compose(argv))
        except UsageError as error:
            fail(error)
    interrupts.install()  # Ctrl-C and `kill`: state saved, MLflow run marked KILLED, resume command printed
    sys.argv = [sys.argv[0], *argv]
    _hydra_app()
    if failed_jobs:
        print(f"finetune: {len(failed_jobs)} sweep job(s) failed: {', '.join(failed_jobs)}", file=sys.stderr)
        sys.exit(USAGE_EXIT)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _hydra_app(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    fresh = not (run_dir / "state.json").exists()
    try:
        validate(cfg)
        tags = {"sweep_dir": hydra_cfg.sweep.dir} if hydra_cfg.mode == RunMode.MULTIRUN else {}
        if cfg.mode == "tune":  # TensorFlow loads only once the config is known to be good
            from finetune.tuning import tune_job

            tune_job(cfg, run_dir, tags)
        else:
            from finetune.run import run_job

            run_job(cfg, run_dir, tags)
    except UsageError as error:
        if hydra_cfg.mode == RunMode.MULTIRUN:  # this job stops; the sweep's other jobs go on
            print(f"finetune: error in job {hydra_cfg.job.num} ({' '.join(hydra_cfg.overrides.task)}): {error}",
                  file=sys.stderr)
            failed_jobs.append(str(hydra_cfg.job.num))
            return
        if fresh:
            shutil.rmtree(run_dir, ignore_errors=True)
        fail(error)
    except ExportError as error:
        print(f"finetune: export failed: {error} (the trained model is in {run_dir}/model.keras)", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        overrides = " ".join(hydra_cfg.overrides.task)
        print(
            f"\nInterrupted. Resume with:\n  python -m finetune {overrides} hydra.run.dir={run_dir}",
            file=sys.stderr,
        )
        sys.exit(INTERRUPT_EXIT)
