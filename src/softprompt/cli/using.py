"""`softprompt generate`, `inspect` and `serve`: using trained prompts."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from softprompt.base_models import model_folder
from softprompt.cli.adapters import first_adapter_run, load_with_adapters
from softprompt.cli.options import options_of
from softprompt.cli.output import print_table
from softprompt.core.interpret import compare_adapters, nearest_tokens
from softprompt.devices import resolve_device, resolve_dtype
from softprompt.scoring.compose import encode_template
from softprompt.scoring.metrics import _shifted, left_pad
from softprompt.serve.server import ServeConfig
from softprompt.serve.vllm_engine import VllmSettings
from softprompt.serve.vllm_process import VllmLaunch, start_vllm, stop_vllm
from softprompt.settings import ListenConfig, named_folders


def cmd_generate(args: argparse.Namespace) -> int:

    adapters = named_folders(args.adapter)
    run = first_adapter_run(adapters)
    model, tokenizer = load_with_adapters(
        args.model or run.model, adapters, args.device, args.dtype, args.allow_base_mismatch
    )
    template = args.template or run.template or "{text}"
    texts = args.text or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        raise ValueError("no input: give texts as arguments or on standard input.")
    names = [n for n, _ in adapters] or [None]
    if args.zero_shot and adapters:
        names = [None] + names

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

    adapters = named_folders([args.adapter] + ([args.compare] if args.compare else []))
    run = first_adapter_run(adapters)
    model, tokenizer = load_with_adapters(
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


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        # the serve extra (FastAPI, uvicorn): only `softprompt serve` needs it, the other commands don't
        import uvicorn

        from softprompt.serve.app import create_app
    except ImportError as err:
        raise RuntimeError(
            f"softprompt serve needs the serve extra ({err.name} is missing): pip install 'softprompt[serve]'"
        ) from None
    resolve_dtype(args.dtype, resolve_device(args.device))  # a bad value stops here, not in the worker
    vllm, started = _vllm_settings(args)
    config = ServeConfig(**options_of(args, ServeConfig), vllm=vllm)
    for folder in config.adapters_dirs:
        if not Path(folder).is_dir():
            raise ValueError(f"--adapters {folder!r} is not a folder.")
    try:
        if started is not None:
            vllm.url = started(config)
        uvicorn.run(
            create_app(config),
            **options_of(args, ListenConfig),
            log_level="debug" if args.verbose else "info",
            timeout_graceful_shutdown=int(args.drain_seconds),
        )
    finally:
        if started is not None:
            started.stop()
    return 0


class _StartedVllm:
    """The vLLM that `--vllm-python` starts for the model (stopped when the server stops)."""

    def __init__(self, python: str, extra: list[str], timeout_s: float) -> None:
        self.python, self.extra, self.timeout_s, self.proc = python, extra, timeout_s, None

    def __call__(self, config: Any) -> str:

        folder = model_folder(config.model)
        log = Path(tempfile.gettempdir()) / f"softprompt-vllm-{os.getpid()}.log"
        print(
            f"starting vLLM for {folder} with {self.python} (log: {log}); this can take minutes", flush=True
        )
        self.proc, url = start_vllm(self.python, folder, log, served_name="model", extra=self.extra)
        print(f"vLLM is ready at {url}", flush=True)
        return url

    def stop(self) -> None:
        if self.proc is not None:
            stop_vllm(self.proc)


def _vllm_settings(args: argparse.Namespace) -> tuple[Any, _StartedVllm | None]:
    """The vLLM settings of `--engine vllm` (and the vLLM to start, for --vllm-python)."""
    if args.engine != "vllm":
        if args.vllm_url or args.vllm_python:
            raise ValueError("--vllm-url and --vllm-python go with --engine vllm.")
        return None, None

    if bool(args.vllm_url) == bool(args.vllm_python):
        raise ValueError(
            "--engine vllm needs either --vllm-url (a running vLLM, started with --enable-prompt-embeds) "
            "or --vllm-python (the Python of an environment with vLLM, to start one)."
        )
    found = options_of(args, VllmSettings, prefix="vllm_")
    settings = VllmSettings(**{**found, "url": found.get("url") or "http://127.0.0.1:0/v1"})
    launch = VllmLaunch(**options_of(args, VllmLaunch, prefix="vllm_"))
    started = None
    if launch.python:
        started = _StartedVllm(launch.python, shlex.split(launch.args), settings.timeout_s)
    return settings, started
