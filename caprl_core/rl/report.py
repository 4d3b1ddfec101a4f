"""`--report-to tensorboard,wandb`: each step's numeric metrics also go to TensorBoard or Weights & Biases, beside
metrics.jsonl (which is written either way and stays the run's record).

    pip install 'caprl-core[tensorboard]'; python -m caprl_core.train --report-to tensorboard
    tensorboard --logdir runs/                     # event files in RUN_DIR/tensorboard
    pip install 'caprl-core[wandb]'; WANDB_MODE=offline python -m caprl_core.train --report-to wandb --wandb-project x
    wandb sync RUN_DIR/wandb/offline-run-*         # later, from a machine that can reach W&B

Both packages are optional and imported only when asked for; a missing one is a `ReportError` naming the install
command, raised before any model loads (`require`). W&B reads its usual environment (WANDB_MODE, WANDB_API_KEY,
WANDB_NAME, WANDB_DIR): its files go under RUN_DIR/wandb unless WANDB_DIR is set; the run is named after RUN_DIR and
carries the run's configuration. Scalars are every int or float of the step's metrics (bools and None left out),
under their metrics.jsonl names, at the step's number. Only rank 0 reports.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from caprl_core.config import TrainConfig

# --report-to name -> the module it needs, and the extra of caprl-core that installs it.
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


class ReportError(ValueError):
    """A --report-to target whose package is not installed."""


def targets(report_to: str) -> list[str]:
    """The targets of a validated --report-to value ("none" -> [])."""
    return [t for t in report_to.split(",") if t != "none"]


def require(report_to: str) -> None:
    """Import what --report-to needs now, so that a missing package stops the run before any model loads."""
    for target in targets(report_to):
        try:
            importlib.import_module(PACKAGES[target])
        except ImportError as e:
            raise ReportError(f"--report-to {target}: the {target} package is not installed ({e}); "
                              f"pip install 'caprl-core[{target}]'") from None  # fmt: skip


def scalars(metrics: dict) -> dict[str, float]:
    """The step's numeric metrics (not its number) as floats."""
    return {k: float(v) for k, v in metrics.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}  # fmt: skip


class _TensorBoard:
    def __init__(self, output_dir: Path, start: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run hides the events past its checkpoint that the interrupted run had written
        self.writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"), purge_step=start or None)

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a few scalars a step: cheap, and a crash loses nothing

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, config: TrainConfig, output_dir: Path) -> None:
        import wandb

        where = {} if os.environ.get("WANDB_DIR") else {"dir": str(output_dir)}  # wandb adds the wandb/ folder
        try:
            self.run = wandb.init(project=config.log.wandb_project or "caprl-core",
                                  name=os.environ.get("WANDB_NAME") or output_dir.resolve().name,
                                  config=config.to_dict(), **where)  # fmt: skip
        except wandb.errors.Error as e:  # no API key, a bad project name, ...
            raise ReportError(f"--report-to wandb: {e} (WANDB_MODE=offline logs without an account)") from None

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class Reporters:
    """The run's --report-to writers (none on ranks other than 0): `log(metrics)` each step, `close()` at the end."""

    def __init__(self, config: TrainConfig, output_dir: Path, start: int = 0, enabled: bool = True) -> None:
        names = targets(config.log.report_to) if enabled else []
        self.writers = [_TensorBoard(output_dir, start) if n == "tensorboard" else _WandB(config, output_dir)
                        for n in names]  # fmt: skip

    def log(self, metrics: dict) -> None:
        values = scalars(metrics)
        for writer in self.writers:
            writer.log(values, int(metrics["step"]))

    def close(self) -> None:
        for writer in self.writers:
            writer.close()
