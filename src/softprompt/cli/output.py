"""What the command line prints: training progress on stderr and plain tables."""

from __future__ import annotations

import sys
import time
from typing import Any


class Progress:
    """Training progress on stderr: a live line on a terminal, a line every 10 steps otherwise.

    Examples/s and the ETA count training time only (evaluations are left out).
    """

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.last = time.time()
        self.train_time = 0.0
        self.steps_timed = 0
        self.examples = 0
        self.total = 0
        self.done = 0

    def __call__(self, event: str, info: dict[str, Any]) -> None:
        now = time.time()
        if event == "phase":
            self._line(info["message"] + " ...")
            self.total, self.done, self.phase_start = info.get("total", 0), 0, now
        elif event == "step":
            self.train_time += now - self.last
            self.steps_timed += 1
            self.examples += info["examples"]
            self._step(info)
        elif event == "progress":
            self.done += info["n"]
            if self.tty and self.total:
                rate = self.done / max(now - self.phase_start, 1e-9)
                self._live(f"  {self.done}/{self.total} examples, {rate:.1f}/s")
        elif event == "eval":
            metric = next(
                k
                for k in info
                if k.startswith("dev_") and k != "dev_examples" and not k.startswith("dev_recall")
            )
            mark = " (best so far, saved)" if info.get("improved") else ""
            self._line(f"step {info['step']}: {metric} = {info[metric]:.4f}{mark}")
        self.last = time.time()

    def _step(self, info: dict[str, Any]) -> None:
        step, total = info["step"], info["total_steps"]
        per_step = self.train_time / max(self.steps_timed, 1)
        text = (
            f"step {step}/{total} | loss {info['loss']:.4f} | lr {info['lr']:.2e} | "
            f"{self.examples / max(self.train_time, 1e-9):.1f} ex/s | ETA {_clock(per_step * (total - step))}"
        )
        if self.tty:
            bar = int(20 * step / max(total, 1))
            self._live(f"[{'#' * bar}{'.' * (20 - bar)}] {text}")
        elif step % 10 == 0 or step == total:
            self._line(text)

    def _live(self, text: str) -> None:
        self.stream.write("\r\033[K" + text)
        self.stream.flush()

    def _line(self, text: str) -> None:
        self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")
        self.stream.flush()


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return (
        f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else f"{seconds // 60}:{seconds % 60:02d}"
    )


def print_table(rows: list[dict[str, Any]], columns: list[str], stream: Any = None) -> None:
    stream = stream or sys.stdout
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    stream.write("  ".join(c.ljust(w) for c, w in zip(columns, widths)) + "\n")
    stream.write("  ".join("-" * w for w in widths) + "\n")
    for row in cells:
        stream.write("  ".join(v.ljust(w) for v, w in zip(row, widths)) + "\n")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else str(value)
