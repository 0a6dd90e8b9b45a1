"""The loss / dev-metric plot written next to a run's metrics."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from softprompt._io import atomic_path

logger = logging.getLogger(__name__)

MIN_METRIC_SPAN = 0.05  # the dev metric's axis covers at least 5 points


def plot_metrics(records: Sequence[dict[str, Any]], path: Path, metric: str = "accuracy") -> Path | None:
    """Draw training loss and the dev metric against the step into a PNG.

    Returns None (with a warning) when matplotlib is not installed: the plot is a
    convenience, the numbers are in metrics.jsonl.
    """
    try:
        # (here, not at the top: it sets matplotlib's backend, which only drawing the plot should do)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plot written (the numbers are in metrics.jsonl).")
        return None
    loss = [(r["step"], r["loss"]) for r in records if "loss" in r and r.get("event") is None]
    dev = [(r["step"], r[f"dev_{metric}"]) for r in records if f"dev_{metric}" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if loss:
        ax.plot(*zip(*loss), color="tab:blue", label="training loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss", color="tab:blue")
    if dev:
        ax2 = ax.twinx()
        ax2.plot(*zip(*dev), color="tab:orange", marker="o", label=f"dev {metric}")
        ax2.set_ylabel(f"dev {metric}", color="tab:orange")
        low, high = min(v for _, v in dev), max(v for _, v in dev)
        if 0 <= low and high <= 1 and high - low < MIN_METRIC_SPAN:  # don't magnify noise
            middle = min(max((low + high) / 2, MIN_METRIC_SPAN / 2), 1 - MIN_METRIC_SPAN / 2)
            ax2.set_ylim(middle - MIN_METRIC_SPAN / 2, middle + MIN_METRIC_SPAN / 2)
    ax.set_title("softprompt training")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
