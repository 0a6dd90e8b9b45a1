"""Experiment trackers for `--report-to`: the lines of metrics.jsonl sent on to TensorBoard,
Weights & Biases or MLflow, by rank 0 only (the Trainer builds them on rank 0 alone).

Every tracker gets the same scalars at the same steps (`scalars`): `train/loss`, `train/lr`,
`train/examples_per_s` every `log_every` steps, `dev/<metric>` at each evaluation and, at the
end, `<split>/<metric>` of the best prompt on the final split (`test`, else `dev`), with
`<split>_zero_shot/<metric>` for the bare model. The run's settings go in as the tracker's
configuration (wandb) or parameters (mlflow).

Where each writes, and why there by default:

- tensorboard: event files in `output_dir/tensorboard` (`pip install 'softprompt[tracking]'`).
- wandb: `wandb.init` in **offline** mode unless `WANDB_MODE` says otherwise (no account, network
  or login prompt needed, and a job on many machines never blocks on one), under
  `output_dir/wandb` (or `WANDB_DIR`), project `WANDB_PROJECT` (default "softprompt"), named after
  the output folder. Upload later with `wandb sync output_dir/wandb/offline-run-*`
  (`pip install 'softprompt[wandb]'`).
- mlflow: the tracking server of `MLFLOW_TRACKING_URI` when it is set, else a local SQLite file,
  `output_dir/mlflow.db` (MLflow's own default store since 3.x; its `./mlruns` file store is in
  maintenance mode and refused unless `MLFLOW_ALLOW_FILE_STORE=true`), experiment
  `MLFLOW_EXPERIMENT_NAME` (default "softprompt"). Look at it with
  `mlflow ui --backend-store-uri sqlite:///output_dir/mlflow.db` (`pip install 'softprompt[mlflow]'`).

A run that fails or is interrupted closes its trackers as failed / killed. A resumed run
opens a new tracker run (its steps continue from the checkpoint's).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from softprompt.settings import REPORTERS, TrainingError, parse_report_to

logger = logging.getLogger(__name__)


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The tracked scalars of one metrics.jsonl record ({} for records with none)."""
    event = record.get("event")
    if event == "eval":
        items = {f"dev/{k[4:]}": v for k, v in record.items() if k.startswith("dev_")}
    elif event == "end":
        split = record.get("final_split")
        items = {}
        for label, prefix in (("tuned", split), ("zero_shot", f"{split}_zero_shot")):
            scores = record.get(label)
            if split and isinstance(scores, dict):
                items.update({f"{prefix}/{k}": v for k, v in scores.items()})
    elif "loss" in record:
        items = {f"train/{k}": record[k] for k in ("loss", "lr", "examples_per_s") if k in record}
    else:
        items = {}
    return {k: float(v) for k, v in items.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class Reporter:
    """One tracker: `log` a record's scalars at a step; `close` once, with how the run ended."""

    def log(self, values: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def close(self, status: str = "finished") -> None:
        """`status`: "finished", "failed" or "killed"."""


def _missing(name: str, extra: str) -> TrainingError:
    return TrainingError(f"--report-to {name} needs the {name} package: pip install 'softprompt[{extra}]'.")


class TensorBoard(Reporter):
    """Scalars as TensorBoard events in `folder`."""

    def __init__(self, folder: Path) -> None:
        try:
            # (optional: `pip install 'softprompt[tracking]'`, only for --report-to tensorboard)
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise _missing("tensorboard", "tracking") from None
        self.writer = SummaryWriter(log_dir=str(folder))

    def log(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self, status: str = "finished") -> None:
        self.writer.close()


class WandB(Reporter):
    """A Weights & Biases run (offline unless `WANDB_MODE` is set) under `out/wandb`."""

    def __init__(self, out: Path, params: dict[str, Any]) -> None:
        try:
            # (optional: `pip install 'softprompt[wandb]'`, only for --report-to wandb)
            import wandb
        except ImportError:
            raise _missing("wandb", "wandb") from None
        mode = os.environ.get("WANDB_MODE") or "offline"
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or "softprompt",
            name=out.name,
            dir=os.environ.get("WANDB_DIR") or str(out),
            mode=mode,
            config=params,
        )
        logger.info("wandb run %s (%s) in %s", self.run.id, mode, self.run.dir)

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self, status: str = "finished") -> None:
        self.run.finish(exit_code=0 if status == "finished" else 1)


class MLflow(Reporter):
    """An MLflow run at `MLFLOW_TRACKING_URI`, else in the SQLite file `out/mlflow.db`."""

    def __init__(self, out: Path, params: dict[str, Any]) -> None:
        try:
            # (optional: `pip install 'softprompt[mlflow]'`, only for --report-to mlflow)
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise _missing("mlflow", "mlflow") from None
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        local = not uri
        if local:
            uri = "sqlite:///" + (out / "mlflow.db").resolve().as_posix()
        try:
            self.client = MlflowClient(tracking_uri=uri)
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "softprompt"
            experiment = self.client.get_experiment_by_name(name)
            if experiment is not None:
                experiment_id = experiment.experiment_id
            else:  # a local store keeps its artifacts beside it, not in ./mlruns of the working folder
                where = (out / "mlflow-artifacts").resolve().as_uri() if local else None
                experiment_id = self.client.create_experiment(name, artifact_location=where)
            run = self.client.create_run(experiment_id, run_name=out.name,
                                         tags={"softprompt.output_dir": str(out.resolve())})  # fmt: skip
        except ImportError as err:  # the SQLite store needs sqlalchemy and alembic
            raise TrainingError(
                f"--report-to mlflow could not open {uri}: {err}. pip install 'softprompt[mlflow]'."
            ) from err
        self.run_id = run.info.run_id
        self.uri = uri
        # at most 100 parameters per call, each value at most 6000 characters
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start : start + 100])
        logger.info("mlflow run %s at %s", self.run_id, uri)

    def log(self, values: dict[str, float], step: int) -> None:
        # (optional, see `start`)
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def close(self, status: str = "finished") -> None:
        state = {"finished": "FINISHED", "killed": "KILLED"}.get(status, "FAILED")
        self.client.set_terminated(self.run_id, state)


class Reporters:
    """The trackers `report_to` names (none: this does nothing), fed metrics.jsonl records."""

    def __init__(self, report_to: str, out: Path, params: dict[str, Any] | None = None) -> None:
        self.reporters: list[Reporter] = []
        self.closed = False
        for name in [] if report_to == "none" else parse_report_to(report_to).split(","):
            if name == "tensorboard":
                self.reporters.append(TensorBoard(out / "tensorboard"))
            elif name == "wandb":
                self.reporters.append(WandB(out, dict(params or {})))
            else:
                self.reporters.append(MLflow(out, dict(params or {})))

    def log(self, record: dict[str, Any]) -> None:
        values = scalars(record)
        if values and not self.closed:
            for reporter in self.reporters:
                reporter.log(values, int(record.get("step", 0)))

    def close(self, status: str = "finished") -> None:
        """Close every tracker once (a failure to close one does not stop the others)."""
        if self.closed:
            return
        self.closed = True
        for reporter in self.reporters:
            try:
                reporter.close(status)
            except Exception:  # the run's own outcome matters more than a tracker's
                logger.warning("closing the %s tracker failed", type(reporter).__name__, exc_info=True)


__all__ = [
    "REPORTERS",
    "MLflow",
    "Reporter",
    "Reporters",
    "TensorBoard",
    "WandB",
    "parse_report_to",
    "scalars",
]
