"""`--report-to tensorboard`: a real run's event file, read back with TensorBoard's own reader,
holds the training loss, learning rate, throughput and dev metrics of metrics.jsonl."""

from __future__ import annotations

import json

import pytest

from softprompt.train import TrainConfig, train
from tests.tiny import review_rows, save_model

pytest.importorskip("tensorboard")


def test_tensorboard_events_hold_the_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    save_model(tmp_path / "model", initializer_range=0.5)
    rows = review_rows(24, 1)
    out = tmp_path / "run"
    config = TrainConfig(
        output_dir=str(out),
        model=str(tmp_path / "model"),
        data=rows,
        dev_data=review_rows(8, 2),
        max_steps=4,
        batch_size=4,
        log_every=2,
        eval_every=2,
        checkpoint_every=100,
        num_virtual_tokens=3,
        zero_shot=False,
        report_to="tensorboard",
        device="cpu",
    )
    train(config)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/examples_per_s", "dev/accuracy"} <= set(scalars), scalars
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert {e.step: e.value for e in events.Scalars("train/loss")} == pytest.approx(losses)
    lrs = {r["step"]: r["lr"] for r in records if "lr" in r}
    assert {e.step: e.value for e in events.Scalars("train/lr")} == pytest.approx(lrs)
    dev = {r["step"]: r["dev_accuracy"] for r in records if r.get("event") == "eval"}
    assert sorted(dev) == [2, 4]
    assert {e.step: e.value for e in events.Scalars("dev/accuracy")} == pytest.approx(dev)


def test_report_to_is_checked():
    with pytest.raises(ValueError, match="report_to must be tensorboard or none"):
        TrainConfig(output_dir="x", report_to="wandb")
    assert TrainConfig(output_dir="x").report_to == "none"
