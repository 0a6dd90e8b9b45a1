"""`--report-to tensorboard|wandb|mlflow`: a real run's tracker data, read back with each
tracker's own reader, holds the training loss, learning rate, throughput and dev metrics of
metrics.jsonl (and the final test scores)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from softprompt.settings import TrainingError
from softprompt.training.trainer import TrainConfig, train
from tests.tiny import review_rows, save_model

TRAIN_TAGS = {"train/loss", "train/lr", "train/examples_per_s"}


@pytest.fixture
def model_dir(tmp_path):
    return save_model(tmp_path / "model", initializer_range=0.5)


def _config(tmp_path: Path, model_dir: Path, report_to: str, **extra) -> TrainConfig:
    return TrainConfig(
        output_dir=str(tmp_path / "run"),
        model=str(model_dir),
        data=review_rows(24, 1),
        dev_data=review_rows(8, 2),
        test_data=review_rows(6, 3),
        max_steps=4,
        batch_size=4,
        log_every=2,
        eval_every=2,
        checkpoint_every=100,
        num_virtual_tokens=3,
        zero_shot=False,
        report_to=report_to,
        device="cpu",
        **extra,
    )


def _expected(out: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} as metrics.jsonl says (what every tracker must hold)."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    want: dict[str, dict[int, float]] = {}
    for r in records:
        if "loss" in r:
            for key in ("loss", "lr", "examples_per_s"):
                want.setdefault(f"train/{key}", {})[r["step"]] = r[key]
        if r.get("event") == "eval":
            want.setdefault("dev/accuracy", {})[r["step"]] = r["dev_accuracy"]
        if r.get("event") == "end":
            want["test/accuracy"] = {r["step"]: r["tuned"]["accuracy"]}
    assert sorted(want["train/loss"]) == [2, 4] and sorted(want["dev/accuracy"]) == [2, 4]
    return want


def _assert_holds(got: dict[str, dict[int, float]], want: dict[str, dict[int, float]]) -> None:
    for tag, values in want.items():
        assert got.get(tag) == pytest.approx(values), (tag, got.get(tag), values)


def test_tensorboard_events_hold_the_metrics(tmp_path, model_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(_config(tmp_path, model_dir, "tensorboard"))
    out = tmp_path / "run"
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert TRAIN_TAGS | {"dev/accuracy", "test/accuracy"} <= set(tags), tags
    _assert_holds({t: {e.step: e.value for e in events.Scalars(t)} for t in tags}, _expected(out))


def test_overwrite_clears_the_previous_runs_tracker_data(tmp_path, model_dir):
    pytest.importorskip("tensorboard")
    train(_config(tmp_path, model_dir, "tensorboard"))
    out = tmp_path / "run"
    old_events = out / "tensorboard" / "events.out.tfevents.old"
    old_events.write_bytes(b"")
    stale = out / "wandb"
    stale.mkdir()
    (stale / "old-run").write_text("x")
    train(_config(tmp_path, model_dir, "tensorboard", overwrite=True))
    assert not stale.exists() and not old_events.exists()
    assert len(list((out / "tensorboard").iterdir())) == 1  # the new run's event file


@pytest.fixture
def wandb_home(tmp_path, monkeypatch):
    """wandb's settings, cache and data folders in tmp_path; WANDB_MODE unset (the default: offline)."""
    for key in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_API_KEY"):
        monkeypatch.delenv(key, raising=False)
    for key in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(key, str(tmp_path / key.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")


def _wandb_records(path: Path):
    """The protobuf records of a `.wandb` file (wandb 0.31 no longer ships a Python reader for its
    run files; the format is LevelDB's log: a 7-byte header, then 32 KiB blocks of chunks, each
    with a 7-byte header: CRC-32C (4), length (2, little-endian), type (1: full, 2: first,
    3: middle, 4: last)), parsed with wandb's own `Record` message."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    block, pos, pieces = 32768, 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if kind == 0:  # zero-filled rest of a block
            pos += left
            continue
        pieces += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(pieces)
            yield record
            pieces = b""


def test_wandb_offline_run_holds_the_metrics(tmp_path, model_dir, wandb_home):
    pytest.importorskip("wandb")
    train(_config(tmp_path, model_dir, "wandb"))
    out = tmp_path / "run"
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((out / "wandb").iterdir())
    (log,) = runs[0].glob("run-*.wandb")
    got: dict[str, dict[int, float]] = {}
    config: dict[str, object] = {}
    finished = None
    for record in _wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            step = int(items.pop("_step"))
            for tag, value in items.items():
                if not tag.startswith("_"):
                    got.setdefault(tag, {})[step] = value
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "run":  # the run's settings: wandb.init's config
            assert record.run.display_name == "run" and record.run.project == "softprompt"
            config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "exit":
            finished = record.exit.exit_code
    assert TRAIN_TAGS | {"dev/accuracy", "test/accuracy"} <= set(got), got
    _assert_holds(got, _expected(out))
    assert config["max_steps"] == 4 and config["report_to"] == "wandb"
    assert finished == 0


def test_mlflow_local_store_holds_the_metrics(tmp_path, model_dir, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.chdir(tmp_path)  # nothing may land in the working folder (./mlruns, ./mlflow.db)
    train(_config(tmp_path, model_dir, "mlflow"))
    out = tmp_path / "run"
    client = MlflowClient(tracking_uri="sqlite:///" + (out / "mlflow.db").as_posix())
    experiment = client.get_experiment_by_name("softprompt")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["max_steps"] == "4" and run.data.params["report_to"] == "mlflow"
    want = _expected(out)
    got = {tag: {m.step: m.value for m in client.get_metric_history(run.info.run_id, tag)} for tag in want}
    _assert_holds(got, want)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "run"]


def test_mlflow_marks_a_failed_run_and_honours_the_tracking_uri(tmp_path, model_dir, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from softprompt.training import trainer as train_module

    uri = "sqlite:///" + (tmp_path / "elsewhere.db").as_posix()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "mine")

    def broken(self, group):
        raise RuntimeError("boom")

    monkeypatch.setattr(train_module.Trainer, "step", broken)
    with pytest.raises(RuntimeError, match="boom"):
        train(_config(tmp_path, model_dir, "mlflow"))
    assert not (tmp_path / "run" / "mlflow.db").exists()
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("mine").experiment_id])
    assert run.info.status == "FAILED"


def test_only_rank_0_reports(tmp_path, wandb_home):
    """Another rank's metrics writer opens no tracker (it would start a second wandb run)."""
    from softprompt.training.trainer import _Metrics

    out = tmp_path / "run"
    out.mkdir()
    metrics = _Metrics(out / "metrics.jsonl", None, enabled=False, report_to="wandb,mlflow,tensorboard")
    metrics.write({"step": 1, "loss": 1.0, "lr": 0.1, "examples_per_s": 3.0})
    metrics.close()
    assert list(out.iterdir()) == []


def test_a_missing_tracker_package_names_the_pip_command(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def without(name, *args, **kwargs):
        if name.split(".")[0] in ("wandb", "mlflow"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without)
    from softprompt.training.tracking import Reporters

    for name in ("wandb", "mlflow"):
        with pytest.raises(TrainingError, match=rf"pip install 'softprompt\[{name}\]'"):
            Reporters(name, tmp_path)


def test_report_to_is_checked():
    expected = "report_to must be none or one or more of tensorboard, wandb, mlflow"
    with pytest.raises(ValueError, match=expected):
        TrainConfig(output_dir="x", report_to="comet")
    with pytest.raises(ValueError, match="got 'none,wandb'"):
        TrainConfig(output_dir="x", report_to="none,wandb")
    assert TrainConfig(output_dir="x").report_to == "none"
    assert TrainConfig(output_dir="x", report_to=" WandB , mlflow,wandb").report_to == "wandb,mlflow"
