"""`softprompt train`: one run (`softprompt.training.train`) or one per seed (`--seeds`)."""

from __future__ import annotations

import argparse
from typing import Any

from softprompt.cli.options import options_of
from softprompt.cli.output import Progress, print_table
from softprompt.scoring.compose import has_prompt_marker, parse_template
from softprompt.training.seeds import train_seeds
from softprompt.training.trainer import TrainConfig, train


def cmd_train(args: argparse.Namespace) -> int:

    config = TrainConfig(**options_of(args, TrainConfig))
    check_template(config.template)
    if args.seeds:
        return _train_seeds(config, args.seeds)
    result = train(config, Progress())
    out = result.output_dir
    metrics = result.metrics
    rows = []
    for label in ("zero_shot", "tuned"):
        if label in metrics:
            rows.append(
                {
                    "model": "bare model (zero-shot)" if label == "zero_shot" else "tuned prompt (best)",
                    **metrics[label],
                }
            )
    if rows:
        print(f"\n{metrics.get('final_split', 'test')} results ({rows[0].get('examples')} examples):")
        columns = ["model"] + [k for k in rows[0] if k not in ("model", "examples")]
        print_table(rows, columns)
    if metrics.get("zero_shot_reused_from"):
        print(f"(the bare model's scores: kept by an earlier run, {metrics['zero_shot_reused_from']})")
    print(
        f"\nsteps: {result.steps} ({metrics.get('stop_reason')}), best dev at step {result.best_step}, "
        f"{result.seconds / 60:.1f} min"
    )
    print(f"adapter:  {out / 'best'}  (last: {out / 'last'})")
    print(f"metrics:  {out / 'metrics.jsonl'}  results: {out / 'results.json'}")
    print(f"plot:     {out / 'plot.png'}")
    print(f"config:   {out / 'run_config.json'}")
    return 0


def check_template(template: str | None) -> None:
    """A template with {prompt} is checked before anything is loaded (a clear error early)."""

    if template and has_prompt_marker(template):
        parse_template(template)


def _train_seeds(config: Any, seeds: list[int]) -> int:

    done = train_seeds(config, seeds, Progress())
    results = done.results
    rows = [{"model": name, **(scores or {})} for name, scores in (results.get("members") or {}).items()]
    if results.get("ensemble"):
        rows.append({"model": f"mean of the {len(rows)} prompts", **results["member_mean"]})
        rows.append({"model": f"ensemble of {len(rows) - 1} prompts", **results["ensemble"]})
    if "zero_shot" in results:
        rows.insert(0, {"model": "bare model (zero-shot)", **results["zero_shot"]})
    if rows:
        print(f"\n{results.get('final_split')} results ({rows[-1].get('examples')} examples):")
        columns = ["model"] + [k for k in rows[-1] if k not in ("model", "examples")]
        print_table(rows, columns)
    if results.get("ensemble_skipped"):
        print(f"no ensemble: {results['ensemble_skipped']}")
    for name, run in done.runs.items():
        print(f"{name}: {run.output_dir / 'best'}  ({run.steps} steps, {run.seconds / 60:.1f} min)")
    print(f"results:  {done.output_dir / 'results.json'}")
    return 0
