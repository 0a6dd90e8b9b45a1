"""`softprompt eval` (labelled data) and `softprompt classify` (new texts): rank classification
through one adapter, several, or their ensemble."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import torch

from softprompt._io import atomic_write_text
from softprompt.cli.adapters import check_ensemble, first_adapter_run, load_with_adapters
from softprompt.cli.options import options_of
from softprompt.cli.output import Progress, print_table
from softprompt.core.bf16 import resolve_bf16
from softprompt.data import BUILTIN, load_builtin, read_examples
from softprompt.scoring.classify import classify_texts, run_settings
from softprompt.scoring.ensemble import classify_ensemble, score_ensemble
from softprompt.settings import DataConfig, named_folders
from softprompt.training.runs import DataSpec, build_objective, load_data


def cmd_eval(args: argparse.Namespace) -> int:

    adapters = named_folders(args.adapter)
    if not adapters and not args.zero_shot:
        raise ValueError("nothing to evaluate: give --adapter PATH (one or more) and/or --zero-shot.")
    if args.ensemble:
        check_ensemble(adapters)
    run = first_adapter_run(adapters)
    model_name = args.model or run.model
    values = options_of(args, DataConfig)
    values.update(template=args.template or run.template, label_words=args.label_words or run.label_words)
    config = DataConfig(**values)
    examples, spec = _eval_examples(config, args.split)
    model, tokenizer = load_with_adapters(
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
        atomic_write_text(
            args.output,
            json.dumps({"data": args.data, "split": args.split, "results": rows}, indent=2) + "\n",
        )
        print(f"saved {args.output}")
    return 0


def _eval_examples(config: Any, split: str):

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

    adapters = named_folders(args.adapter)
    if args.ensemble:
        check_ensemble(adapters)
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
    model, tokenizer = load_with_adapters(
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
