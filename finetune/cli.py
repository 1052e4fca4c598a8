"""Command line: `finetune key=value ...` (Hydra overrides) and `finetune summary|scan|export|predict|report ...`.

Config errors and refused run folders exit 2 with one line, before anything is written.
"""

from __future__ import annotations

import errno
import importlib
import itertools
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

from finetune import interrupts, quiet, runfolder
from finetune.artifacts import ExportError
from finetune.config import CONF_DIR, UsageError, compose, validate

SUBCOMMANDS = {
    "summary": "finetune.summary",
    "scan": "finetune.scan",
    "export": "finetune.export",
    "predict": "finetune.predict",
    "report": "finetune.report",
}
USAGE_EXIT = 2
INTERRUPT_EXIT = 130
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
failed_jobs: list[str] = []  # multirun jobs stopped by a config error; the sweep exits 2 after the others ran


def fail(error: UsageError) -> None:
    """Print the one-line reason and exit with status 2."""
    print(f"finetune: error: {error}", file=sys.stderr)
    sys.exit(USAGE_EXIT)


def disk_full(error: BaseException | None) -> bool:
    """Whether the error, or one it arose from, is a full disk or quota (TensorFlow's own file errors say so in
    their message only)."""
    while error is not None:
        if getattr(error, "errno", None) in DISK_FULL or "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def main(argv: list[str] | None = None) -> None:
    """Dispatch subcommands; check the config and the run folder before Hydra writes anything; run the app."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SUBCOMMANDS:
        if argv[0] != "report":  # the report reads MLflow only
            quiet.import_tensorflow()
        importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:])
        return
    try:
        if not any(arg.startswith("-") for arg in argv):  # Hydra's own flags (--cfg, --help) go straight through
            argv = _check_run(argv)
        elif {"-m", "--multirun"} & set(argv):
            _check_sweep([arg for arg in argv if not arg.startswith("-")])
    except UsageError as error:
        fail(error)
    interrupts.install()  # Ctrl-C and `kill`: state saved, MLflow run marked KILLED, resume command printed
    sys.argv = [sys.argv[0], *argv]
    _hydra_app()
    if failed_jobs:
        print(f"finetune: {len(failed_jobs)} sweep job(s) failed: {', '.join(failed_jobs)}", file=sys.stderr)
        sys.exit(USAGE_EXIT)


def _check_run(argv: list[str]) -> list[str]:
    """Check the config and the run folder; return the overrides with the checked folder made explicit."""
    global folder_before
    cfg = compose(argv, hydra_node=True)
    run_dir = Path(cfg.hydra.run.dir)
    with open_dict(cfg):
        del cfg["hydra"]
    validate(cfg)
    runfolder.check(run_dir, cfg)
    folder_before = FolderSnapshot.take(run_dir)
    if any(arg.startswith("hydra.run.dir=") for arg in argv):
        return argv
    return [*argv, f"hydra.run.dir={run_dir}"]  # the folder just checked, not a second ${now:} reading


SWEEP_CHECK_LIMIT = 256  # jobs composed before a sweep starts; beyond that, each job checks itself


def _check_sweep(overrides: list[str]) -> None:
    """Every job of a sweep must compose: a value of the wrong type would stop Hydra's launch with a traceback.

    Settings that compose but do not fit together (an alpha without ImageNet weights, say) stop only their
    own job, with one line, while the other jobs run.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    values = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
              else [o.input_line] for o in parsed]
    for job in itertools.islice(itertools.product(*values), SWEEP_CHECK_LIMIT):
        compose(list(job))


@dataclass(frozen=True)
class FolderSnapshot:
    """What existed of a run folder before this process: so a failed start removes only what it created."""

    run_dir: Path
    created_root: Path | None  # the topmost folder of run_dir's path that did not exist yet
    entries: frozenset[str]  # what the run folder already held

    @classmethod
    def take(cls, run_dir: Path) -> FolderSnapshot:
        missing = [path for path in (run_dir, *run_dir.parents) if not path.exists()]
        entries = frozenset(entry.name for entry in run_dir.iterdir()) if run_dir.is_dir() else frozenset()
        return cls(run_dir, missing[-1] if missing else None, entries)

    def remove_created(self) -> None:
        """Delete what this process added to the run folder (and the folders it made for it), nothing else."""
        if self.created_root is not None:
            shutil.rmtree(self.created_root, ignore_errors=True)
            return
        for entry in self.run_dir.iterdir():
            if entry.name not in self.entries:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


folder_before: FolderSnapshot | None = None  # set by main() for a single run


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _hydra_app(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        if hydra_cfg.mode == RunMode.MULTIRUN:  # a single run's config and folder were checked before Hydra started
            validate(cfg)
            runfolder.check(run_dir, cfg)
        quiet.import_tensorflow()
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
        if folder_before is not None:
            folder_before.remove_created()
        fail(error)
    except ExportError as error:
        print(f"finetune: export failed: {error} (the trained model is in {run_dir}/model.keras; "
              f"rerun the same command with hydra.run.dir={run_dir} to retry the export only)", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"\nInterrupted. Resume with:\n  {_resume_command(run_dir)}", file=sys.stderr)
        sys.exit(INTERRUPT_EXIT)
    except Exception as error:
        if not disk_full(error):
            raise
        print(f"finetune: the disk is full ({error}); what the run finished is kept. Free some space and resume "
              f"with:\n  {_resume_command(run_dir)}", file=sys.stderr)
        sys.exit(1)


def _resume_command(run_dir: Path) -> str:
    return f"python -m finetune {' '.join(HydraConfig.get().overrides.task)} hydra.run.dir={run_dir}"
