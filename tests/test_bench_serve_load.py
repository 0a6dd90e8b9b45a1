"""bench/serve_load.py's interleaved rounds: the order the servers run in, and the summary
the report prints (checked against numbers worked out by hand)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import serve_load


def _level(target: str, c: int, r: int, tput: float, p99: float | None) -> dict:
    return {"target": target, "concurrency": c, "round": r, "throughput_tok_s": tput, "latency_p99_s": p99}


def test_rounds_summary_by_hand():
    ours, theirs = "softprompt serve, bare model", "transformers serve, bare model"
    levels = []
    for r, (a, b, pa, pb) in enumerate([(100, 100, 1.0, 1.1), (90, 100, 1.2, 1.1), (120, 100, 0.8, 1.1)]):
        levels += [_level(ours, 16, r, a, pa), _level(theirs, 16, r, b, pb)]
    levels += [_level(ours, 64, 0, 50, None), _level(theirs, 64, 0, 40, 2.0)]  # no p99: no pair
    lines = serve_load.rounds_summary(levels)
    rows = [line for line in lines if line.startswith(f"| {theirs} |")]
    # ratios 1.0, 0.9, 1.2: median 1.00, range 0.90-1.20; our p99 1.0/1.2/0.8 (median 1.0)
    # against 1.1 each: higher in round 2 only; the 64 level has no complete pair
    assert rows == [f"| {theirs} | 16 | 3 | 1.00 (0.90-1.20) | 1.000 / 1.100 | 1 of 3 |"]


def test_rounds_summary_needs_two_rounds():
    one = [_level("a", 1, 0, 10, 1.0), _level("b", 1, 0, 12, 0.9)]
    assert serve_load.rounds_summary(one) == []  # one round
    assert serve_load.rounds_summary([{k: v for k, v in lv.items() if k != "round"} for lv in one]) == []


def test_run_interleaved_reverses_the_order_every_other_round(monkeypatch):
    calls: list[tuple] = []
    monkeypatch.setattr(serve_load, "warm_up", lambda url, *a: calls.append(("warm", url)))

    async def fake_load(url, models, prompts, n, c, *a):
        calls.append(("busiest", url, n, c))
        return {}

    def fake_level(url, target, models, prompts, args, c, out):
        calls.append(("level", url, c))
        out.append({"target": target, "concurrency": c})
        return out[-1]

    monkeypatch.setattr(serve_load, "load_level", fake_load)
    monkeypatch.setattr(serve_load, "run_level", fake_level)
    args = argparse.Namespace(rounds=3, concurrency=[1, 4], max_tokens=8, write=lambda out: None)
    out: list = []
    servers = [("ours", "A", ["m"]), ("theirs", "B", ["m"])]
    serve_load.run_interleaved(servers, ["p"], args, out)
    assert calls[:4] == [("warm", "A"), ("busiest", "A", 4, 4), ("warm", "B"), ("busiest", "B", 4, 4)]
    order = [(url, c) for _, url, c in calls[4:]]
    ab = [("A", 1), ("B", 1), ("A", 4), ("B", 4)]
    ba = [("B", 1), ("A", 1), ("B", 4), ("A", 4)]
    assert order == ab + ba + ab
    assert [lv["round"] for lv in out] == [0] * 4 + [1] * 4 + [2] * 4
