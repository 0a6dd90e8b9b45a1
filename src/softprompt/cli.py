"""`softprompt`: train, evaluate, use and inspect soft prompts from the command line.

A thin shell over the Python API: `train` is `softprompt.train.train`, `eval` scores
adapters with `softprompt.objectives`, `generate` calls `SoftPromptModel.generate`,
`inspect` calls `softprompt.interpret`. Option help comes from the same dataclass fields
and docstrings. This is the only module that prints; errors become one-line messages.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .settings import AdapterRun

EXIT_ERROR, EXIT_DIVERGED, EXIT_INTERRUPTED = 2, 3, 130


# ---------------------------------------------------------------------- option parsing
def parse_label_words(value: str) -> dict[str, str]:
    """JSON ('{"positive": " positive"}') or 'label=word,label=word' (a word keeps its spaces)."""
    value = value.strip()
    if value.startswith("{"):
        try:
            data = json.loads(value)
        except json.JSONDecodeError as err:
            raise argparse.ArgumentTypeError(f"label words are not valid JSON: {err}") from None
        if not isinstance(data, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in data.items()
        ):
            raise argparse.ArgumentTypeError("label words must map label names to words (strings).")
        return data
    out = {}
    for part in value.split(","):
        if "=" not in part:
            raise argparse.ArgumentTypeError(
                f"label words: {part!r} is not label=word (or give a JSON object)."
            )
        label, word = part.split("=", 1)
        out[label.strip()] = word
    return out


def parse_seeds(value: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]: distinct integer seeds."""
    try:
        seeds = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"seeds: {value!r} is not a list of integers such as 0,1,2."
        ) from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"seeds: give distinct integers such as 0,1,2; got {value!r}.")
    return seeds


def _optional(kind: type) -> Any:
    def parse(value: str) -> Any:
        return None if value.lower() in ("none", "null", "") else kind(value)

    parse.__name__ = kind.__name__
    return parse


def _unescape(value: str) -> str:
    """Let '\\n' typed on a command line mean a newline (templates)."""
    return value.encode("utf-8").decode("unicode_escape") if "\\" in value else value


def add_dataclass_options(
    parser: argparse.ArgumentParser,
    cls: type,
    skip: tuple[str, ...] = (),
    notes: dict[str, str] | None = None,
    only: tuple[str, ...] | None = None,
) -> None:
    """One `--option` per dataclass field, typed from the annotation, help from metadata.

    Args:
        parser: The (sub)command's parser.
        cls: A settings dataclass (`softprompt.settings`).
        skip: Fields that are not options of this command.
        notes: Text appended to a field's help for this command (e.g. where its default comes from).
        only: If given, just these fields.
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or (only is not None and f.name not in only):
            continue
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        args = typing.get_args(hint)
        optional = type(None) in args
        base = next((a for a in args if a is not type(None)), hint)
        help_text = f.metadata.get("help", "") + (f" {notes[f.name]}" if notes and f.name in notes else "")
        help_text = help_text.replace("%", "%%")  # argparse %-formats help texts
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
            continue
        if typing.get_origin(base) is dict or base is dict:
            conv: Any = parse_label_words
        elif f.name in ("template", "init_text"):
            conv = _unescape
        elif base in (int, float):
            conv = _optional(base) if optional else base
        else:
            conv = str
        parser.add_argument(
            flag,
            type=conv,
            default=default,
            help=f"{help_text} (default: {str(default).replace('%', '%%')!r})"
            if default is not None
            else f"{help_text}",
        )


# ---------------------------------------------------------------------- progress
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


# ---------------------------------------------------------------------- commands
def cmd_train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train

    config = TrainConfig(**_options(args, TrainConfig))
    _check_template(config.template)
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
    print(
        f"\nsteps: {result.steps} ({metrics.get('stop_reason')}), best dev at step {result.best_step}, "
        f"{result.seconds / 60:.1f} min"
    )
    print(f"adapter:  {out / 'best'}  (last: {out / 'last'})")
    print(f"metrics:  {out / 'metrics.jsonl'}  results: {out / 'results.json'}")
    print(f"plot:     {out / 'plot.png'}")
    print(f"config:   {out / 'run_config.json'}")
    return 0


def _check_template(template: str | None) -> None:
    """A template with {prompt} is checked before anything is loaded (a clear error early)."""
    from .evaluate import has_prompt_marker

    if template and has_prompt_marker(template):
        from .compose import parse_template

        parse_template(template)


def _train_seeds(config: Any, seeds: list[int]) -> int:
    from .ensemble import train_seeds

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


def _adapter_specs(values: list[str] | None) -> list[tuple[str, Path]]:
    """'name=path' or 'path' (named after its folder) -> (name, path), names unique."""
    specs: list[tuple[str, Path]] = []
    for value in values or []:
        name, _, path = value.rpartition("=") if "=" in value else ("", "", value)
        p = Path(path)
        if not name:
            name = "_".join(part for part in p.resolve().parts[-2:] if part not in ("/",))
        name = "".join(ch if ch.isalnum() or ch in "_-" else "_" for ch in name)[:64] or "adapter"
        while name in [n for n, _ in specs]:
            name += "_"
        specs.append((name, p))
    return specs


def _run_settings(adapters: list[tuple[str, Path]]) -> AdapterRun:
    """The settings of the run the first adapter with a run_config.json came from."""
    from .settings import AdapterRun, adapter_run

    for _, path in adapters:
        found = adapter_run(path)
        if found is not None:
            return found
    return AdapterRun()


def _load_with_adapters(
    model_name: str | None,
    adapters: list[tuple[str, Path]],
    device: str | None = None,
    dtype: str | None = None,
    allow_base_mismatch: bool = False,
):
    from .base_models import load_model
    from .config import PromptTuningConfig
    from .model import SoftPromptModel

    if device is None:  # the CPU in float32
        base, tokenizer = load_model(model_name)
    else:
        from .distributed import resolve_device, resolve_dtype

        where = resolve_device(device)
        base, tokenizer = load_model(model_name, dtype=resolve_dtype(dtype, where), device=where)
    if adapters:
        first_name, first_path = adapters[0]
        model = SoftPromptModel.from_pretrained(
            base, first_path, adapter_name=first_name, allow_base_mismatch=allow_base_mismatch
        )
        for name, path in adapters[1:]:
            model.load_adapter(path, name, allow_base_mismatch=allow_base_mismatch)
    else:  # the bare model only: a placeholder prompt that is never used
        model = SoftPromptModel(
            base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=1), "unused", trainable=False
        )
    return model.eval(), tokenizer


def cmd_eval(args: argparse.Namespace) -> int:
    from .runs import DataSpec, build_objective
    from .settings import DataConfig

    adapters = _adapter_specs(args.adapter)
    if not adapters and not args.zero_shot:
        raise ValueError("nothing to evaluate: give --adapter PATH (one or more) and/or --zero-shot.")
    if args.ensemble:
        _check_ensemble(adapters)
    run = _run_settings(adapters)
    model_name = args.model or run.model
    values = _options(args, DataConfig)
    values.update(template=args.template or run.template, label_words=args.label_words or run.label_words)
    config = DataConfig(**values)
    examples, spec = _eval_examples(config, args.split)
    model, tokenizer = _load_with_adapters(
        model_name, adapters, args.device, args.dtype, args.allow_base_mismatch
    )
    objective = build_objective(
        DataSpec(spec.task, examples, None, None, spec.template, spec.label_words),
        examples,
        tokenizer,
        config,
    )
    if args.limit:
        indices = list(range(min(args.limit, len(objective))))
    else:
        indices = None
    import torch

    from .bf16 import resolve_bf16

    device = model.device
    bf16 = resolve_bf16(args.bf16, device)
    rows = []
    targets = ([("bare model (zero-shot)", None)] if args.zero_shot else []) + [(n, n) for n, _ in adapters]
    if args.ensemble:  # the members are scored together below
        targets = targets[:1] if args.zero_shot else []
    for label, name in targets:
        progress = Progress()
        progress("phase", {"message": f"scoring {label}", "total": len(indices or objective.lengths)})
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            scores = objective.evaluate(
                model,
                indices,
                adapter=name,
                batch_size=args.batch_size,
                progress=lambda n, progress=progress: progress("progress", {"n": n}),
            )
        rows.append({"model": label, **scores})
    if args.ensemble:
        from .ensemble import score_ensemble

        Progress()("phase", {"message": f"scoring the ensemble of {len(adapters)} prompts in one pass"})
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            result = score_ensemble(objective, model, [n for n, _ in adapters], indices, args.batch_size)
        rows.extend({"model": name, **scores} for name, scores in result.members.items())
        rows.append({"model": f"ensemble of {len(adapters)} (mean log-prob)", **result.ensemble})
        sys.stderr.write(f"ensemble pass: {result.seconds:.1f} s; best member: {result.best_member}\n")
    sys.stderr.write("\n")
    columns = ["model"] + [k for k in rows[0] if k != "model"]
    print_table(rows, columns)
    if args.output:
        from ._io import atomic_write_text

        atomic_write_text(
            args.output,
            json.dumps({"data": args.data, "split": args.split, "results": rows}, indent=2) + "\n",
        )
        print(f"saved {args.output}")
    return 0


def _check_ensemble(adapters: list[tuple[str, Path]]) -> None:
    from .ensemble import check_same_format

    if len(adapters) < 2:
        raise ValueError("--ensemble needs two or more --adapter (the members).")
    check_same_format(adapters)


def _eval_examples(config: Any, split: str):
    from .data import BUILTIN, load_builtin, read_examples
    from .runs import load_data

    if config.data in BUILTIN:
        spec = load_data(config)
        return load_builtin(config.data, split), spec
    spec = load_data(dataclasses.replace(config, dev_data=config.data))  # dev_data: no 10% held out
    examples, _ = read_examples(
        config.data,
        task=spec.task,
        text_field=config.text_field,
        label_field=config.label_field,
        target_field=config.target_field,
        skip_invalid=config.skip_invalid,
    )
    return examples, spec


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    adapters = _adapter_specs(args.adapter)
    run = _run_settings(adapters)
    model, tokenizer = _load_with_adapters(
        args.model or run.model, adapters, args.device, args.dtype, args.allow_base_mismatch
    )
    template = args.template or run.template or "{text}"
    texts = args.text or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        raise ValueError("no input: give texts as arguments or on standard input.")
    names = [n for n, _ in adapters] or [None]
    if args.zero_shot and adapters:
        names = [None] + names
    from .evaluate import _shifted, encode_template, left_pad

    rows, positions = encode_template(tokenizer, texts, template, args.max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids, mask = left_pad(rows, pad, model.device)
    prompt_positions = _shifted(positions, rows, ids.shape[1], model.device)  # None: no {prompt}
    results = []
    for name in names:
        torch.manual_seed(args.seed)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            adapter_names=name or "__base__",
            prompt_positions=prompt_positions,
            max_new_tokens=args.max_new_tokens,
            do_sample=args.sample,
            temperature=args.temperature,
            pad_token_id=pad,
        )
        for i, text in enumerate(texts):
            completion = tokenizer.decode(out[i, ids.shape[1] :], skip_special_tokens=True)
            results.append({"adapter": name or "(bare model)", "input": text, "output": completion})
    if args.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
    else:
        for r in results:
            print(f"[{r['adapter']}] {r['input']!r}\n  -> {r['output']!r}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .interpret import compare_adapters, nearest_tokens

    adapters = _adapter_specs([args.adapter] + ([args.compare] if args.compare else []))
    run = _run_settings(adapters)
    model, tokenizer = _load_with_adapters(
        args.model or run.model, adapters, allow_base_mismatch=args.allow_base_mismatch
    )
    report: dict[str, Any] = {
        "adapter": str(adapters[0][1]),
        "tokens": nearest_tokens(model, tokenizer, adapters[0][0], top_k=args.top_k),
    }
    if args.compare:
        report["comparison"] = compare_adapters(model, adapters[0][0], adapters[1][0])
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
        return 0
    print(f"{adapters[0][1]}: {len(report['tokens'])} virtual tokens")
    rows = [
        {
            "#": t["position"],
            "norm": t["norm"],
            "nearest tokens (cosine)": ", ".join(f"{n['token']!r} {n['cosine']:.2f}" for n in t["nearest"]),
        }
        for t in report["tokens"]
    ]
    print_table(rows, ["#", "norm", "nearest tokens (cosine)"])
    if args.compare:
        c = report["comparison"]
        print(
            f"\nvs {adapters[1][1]}: mean cosine of aligned positions {c['mean_position_cosine']:.4f}, "
            f"of whole prompts {c['prompt_cosine']:.4f}, best-match mean {c['mean_best_match_cosine']:.4f}"
        )
    return 0


def _read_classify_rows(path: str, field: str) -> list[dict[str, Any]]:
    """Rows to label from a .jsonl/.json file (objects with `field`) or a text file (a line each)."""
    text = Path(path).read_text(encoding="utf-8")
    if path.endswith((".jsonl", ".json")):
        data = (
            json.loads(text)
            if path.endswith(".json")
            else [json.loads(x) for x in text.splitlines() if x.strip()]
        )
        if not isinstance(data, list) or not all(
            isinstance(r, dict) and isinstance(r.get(field), str) for r in data
        ):
            raise ValueError(
                f"{path}: every row must be an object with a string field {field!r} (--text-field)."
            )
        return data
    return [{field: line} for line in text.splitlines() if line.strip()]


def cmd_classify(args: argparse.Namespace) -> int:
    from .classify import classify_texts, run_settings

    adapters = _adapter_specs(args.adapter)
    if args.ensemble:
        _check_ensemble(adapters)
    elif len(adapters) > 1:
        raise ValueError("several --adapter label texts together only with --ensemble; or give one.")
    run = run_settings(adapters[0][1])
    template = args.template or run.get("template")
    label_words = args.label_words or run.get("label_words")
    if not template or not label_words:
        raise ValueError(
            f"{adapters[0][1]} has no run_config.json with a template and label words; "
            "pass --template and --label-words."
        )
    if args.data:
        rows = _read_classify_rows(args.data, args.text_field)
    else:
        texts = args.text or [line.rstrip("\n") for line in sys.stdin if line.strip()]
        rows = [{args.text_field: t} for t in texts]
    if not rows:
        raise ValueError("no input: give texts as arguments, --data FILE, or lines on standard input.")
    model, tokenizer = _load_with_adapters(
        args.model or run.get("model"), adapters, allow_base_mismatch=args.allow_base_mismatch
    )
    options = {
        "template": template,
        "label_words": label_words,
        "max_length": args.max_length or run.get("max_length") or 256,
        "batch_size": args.batch_size,
    }
    texts = [r[args.text_field] for r in rows]
    if args.ensemble:
        from .ensemble import classify_ensemble

        results = classify_ensemble(model, tokenizer, texts, [n for n, _ in adapters], **options)
    else:
        results = classify_texts(model, tokenizer, texts, adapter=adapters[0][0], **options)
    out = [
        {
            **row,
            "prediction": r["label"],
            "probs": r["probs"],
            **({"members": r["members"]} if "members" in r else {}),
        }
        for row, r in zip(rows, results)
    ]
    if args.output:
        Path(args.output).write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out), encoding="utf-8"
        )
        print(f"wrote {len(out)} predictions to {args.output}", file=sys.stderr)
    elif args.json:
        print(json.dumps(out, indent=2, ensure_ascii=False))
    else:
        for r in out:
            members = (
                "\t" + " ".join(f"{n}={m['label']}" for n, m in r["members"].items())
                if "members" in r
                else ""
            )
            print(f"{r['prediction']}\t{r['probs'][r['prediction']]:.4f}{members}\t{r[args.text_field]}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .serve.app import ServeConfig, create_app
    except ImportError as err:
        raise RuntimeError(
            f"softprompt serve needs the serve extra ({err.name} is missing): pip install 'softprompt[serve]'"
        ) from None
    config = ServeConfig(
        model=args.model,
        base_id=args.served_model_name,
        adapters={name: str(path) for name, path in _adapter_specs(args.adapter)},
        adapters_dirs=list(args.adapters or []),
        adapter_roots=list(args.adapter_root or []),
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
        prompt_cache_mb=args.prompt_cache_mb,
        allow_adapter_updates=args.allow_adapter_updates,
        allow_base_mismatch=args.allow_base_mismatch,
        api_key=args.api_key or os.environ.get("SOFTPROMPT_API_KEY") or None,
        max_body_bytes=int(args.max_body_mb * 2**20),
        drain_seconds=args.drain_seconds,
    )
    for folder in config.adapters_dirs:
        if not Path(folder).is_dir():
            raise ValueError(f"--adapters {folder!r} is not a folder.")
    uvicorn.run(
        create_app(config),
        host=args.host,
        port=args.port,
        log_level="debug" if args.verbose else "info",
        timeout_graceful_shutdown=int(args.drain_seconds),
    )
    return 0


# ---------------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    from .train import TrainConfig

    parser = argparse.ArgumentParser(prog="softprompt", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="Show debug logging.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="Train a soft prompt.", description=TrainConfig.__doc__)
    add_dataclass_options(p, TrainConfig, skip=("output_dir",))
    p.add_argument(
        "--output",
        "--output-dir",
        dest="output_dir",
        required=True,
        help=TrainConfig.__dataclass_fields__["output_dir"].metadata["help"],
    )
    p.add_argument(
        "--seeds",
        type=parse_seeds,
        default=None,
        help="Train one prompt per seed (e.g. 0,1,2; replaces --seed) into OUTPUT/seed-<k>/, then score the "
        "ensemble of their best prompts (one batched pass) next to each prompt in OUTPUT/results.json.",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="Score adapters (and the bare model) on labelled data.")
    p.add_argument("--adapter", action="append", help="Adapter folder, or name=folder; repeat for several.")
    p.add_argument(
        "--zero-shot", action=argparse.BooleanOptionalAction, default=True, help="Also score the bare model."
    )
    p.add_argument("--split", default="test", help="Split of a built-in set: train, dev or test.")
    _model_and_data_options(p)
    p.add_argument("--batch-size", type=int, default=64, help="Examples per forward pass.")
    p.add_argument("--limit", type=int, default=None, help="Score only the first N examples.")
    p.add_argument("--output", default=None, help="Write the results as JSON here.")
    p.add_argument("--ensemble", action="store_true", help=_ENSEMBLE_HELP)
    _allow_base_mismatch_option(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="Text in, text out, through one or more adapters.")
    p.add_argument("text", nargs="*", help="Input texts (default: one per line on standard input).")
    p.add_argument("--adapter", action="append", help="Adapter folder, or name=folder; repeat for several.")
    p.add_argument("--zero-shot", action="store_true", help="Also answer with the bare model.")
    _model_and_data_options(p, only=("model", "device", "dtype", "template", "max_length", "max_new_tokens"))
    p.add_argument("--sample", action="store_true", help="Sample instead of greedy decoding.")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="Print JSON.")
    _allow_base_mismatch_option(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("inspect", help="What a prompt learned: nearest tokens, norms, similarity.")
    p.add_argument("adapter", help="Adapter folder.")
    p.add_argument("--compare", default=None, help="A second adapter folder to compare with.")
    _model_and_data_options(p, only=("model",))
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--json", action="store_true", help="Print JSON.")
    _allow_base_mismatch_option(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("classify", help="Label new texts with a classification prompt (no labels needed).")
    p.add_argument("text", nargs="*", help="Texts (default: --data, else one per line on standard input).")
    p.add_argument(
        "--adapter",
        action="append",
        required=True,
        help="Adapter folder (its run gives template and label words); several with --ensemble.",
    )
    p.add_argument(
        "--data", default=None, help="A .jsonl/.json file of objects, or a text file (a line each)."
    )
    p.add_argument("--text-field", default="text", help="The field holding the text in --data rows.")
    p.add_argument("--output", default=None, help="Write predictions as JSON lines here.")
    p.add_argument("--model", default=None, help="Model id or folder (default: the adapter's run).")
    p.add_argument("--template", type=_unescape, default=None, help="Template with {text} " + _FROM_RUN)
    p.add_argument("--label-words", type=parse_label_words, default=None, help="label=word,... " + _FROM_RUN)
    p.add_argument("--max-length", type=int, default=None, help="Longest templated input " + _FROM_RUN)
    p.add_argument("--batch-size", type=int, default=64, help="Texts per forward pass.")
    p.add_argument("--json", action="store_true", help="Print JSON.")
    p.add_argument("--ensemble", action="store_true", help=_ENSEMBLE_HELP)
    _allow_base_mismatch_option(p)
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("serve", help="OpenAI-compatible server: one model, many soft prompts.")
    p.add_argument("--model", default=None, help="Model id or local folder (default: SmolLM2-135M-Instruct).")
    p.add_argument("--served-model-name", default=None, help="The base model's name in requests.")
    p.add_argument("--adapters", action="append", help="Serve every adapter folder under DIR by folder name.")
    p.add_argument("--adapter", action="append", help="name=folder (or folder); repeat for several.")
    p.add_argument("--adapter-root", action="append", help="A further folder /v1/load_adapter may load from.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch-size", type=int, default=32, help="Sequences decoded together at most.")
    p.add_argument("--max-queue", type=int, default=256, help="Waiting requests at most (then 429).")
    p.add_argument("--prompt-cache-mb", type=float, default=None, help="Memory for prompt KVs (LRU).")
    p.add_argument("--allow-adapter-updates", action="store_true", help="Enable load/unload_adapter.")
    p.add_argument("--api-key", default=None, help="Require this bearer key (or SOFTPROMPT_API_KEY).")
    p.add_argument("--max-body-mb", type=float, default=1.0, help="Larger request bodies get 413.")
    p.add_argument("--drain-seconds", type=float, default=30.0, help="Time running requests get at shutdown.")
    _allow_base_mismatch_option(p)
    p.set_defaults(func=cmd_serve)
    return parser


_FROM_RUN = "(default: the adapter's run)"
_ENSEMBLE_HELP = (
    "Combine the --adapter prompts (two or more, trained with the same template and label words) into "
    "an ensemble: the mean of their label log-probabilities, all scored in one batched pass; each "
    "member is reported too."
)


def _allow_base_mismatch_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-base-mismatch",
        action="store_true",
        help="Load adapters saved from a different base model of the same width (refused by default).",
    )


_RUN_NOTES = {
    "model": "With an adapter: the model of its run.",
    "template": _FROM_RUN,
    "label_words": _FROM_RUN,
}


def _model_and_data_options(p: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> None:
    """Model and data options of the commands that use an adapter: the same fields, defaults
    and help as `train` (`softprompt.settings`), defaults taken from the adapter's run."""
    from .settings import DataConfig, ModelConfig

    add_dataclass_options(p, ModelConfig, notes=_RUN_NOTES, only=only)
    add_dataclass_options(p, DataConfig, skip=("dev_data", "test_data"), notes=_RUN_NOTES, only=only)


def _options(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The parsed options that are fields of settings dataclass `cls`."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s", stream=sys.stderr
    )
    logging.getLogger("softprompt").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    for noisy in ("transformers", "huggingface_hub", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight-loading bars; softprompt reports its own progress
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from .train import TrainingDiverged, TrainingInterrupted

    try:
        return int(args.func(args) or 0)
    except TrainingInterrupted as err:
        sys.stderr.write(f"\n{err}\n")
        return EXIT_INTERRUPTED
    except TrainingDiverged as err:
        sys.stderr.write(f"\nerror: {err}\n")
        return EXIT_DIVERGED
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted\n")
        return EXIT_INTERRUPTED
    except (ValueError, TypeError, OSError, RuntimeError, KeyError) as err:
        if args.verbose:
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        sys.stderr.write(f"error: {message}\n")
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


__all__ = ["build_parser", "main", "parse_label_words", "parse_seeds"]
