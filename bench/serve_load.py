"""Load test of `softprompt serve`: C concurrent clients over K adapters, open-loop arrivals.

Starts a server (or uses `--url`), sends `--requests` streamed completions per
concurrency level with the async `openai` client (fixed prompts, fixed `max_tokens`,
greedy), and reports throughput (generated tokens/s), p50/p99 time to first token and
latency, and errors. For comparison, the same prompts one request at a time in-process:
through softprompt (`SoftPromptModel.generate`) and through PEFT prompt tuning - the
loop a user writes today (PEFT's generate is also wrong with transformers 5: its tokens
are reported, not trusted). `transformers serve` is not run here (it is not set up for
offline use on this machine); compare with it by pointing `--url` at it with `--bare`.

    python bench/serve_load.py --tiny --concurrency 1 4 16          # seconds, a tiny model
    python bench/serve_load.py --adapters-count 8 --concurrency 1 8 32 64 --requests 128

Writes bench/results/serve-<name>.json, .md and .png. Nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = [
    "Review: a warm, funny and moving film.\nSentiment:",
    "Review: dull, too long and badly acted.\nSentiment:",
    "Question: what is the capital of France?\nAnswer:",
    "Write a haiku about autumn leaves.",
    "Summarise: the meeting moved to Tuesday because the room was booked.",
    "Translate to French: good morning, my friend.",
]
TINY_PROMPTS = ["good movie", "the plot was very boring", "love it", "awful acting so bad", "fun story"]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


def make_adapters(folder: Path, count: int, tiny: bool) -> tuple[str | None, Path]:
    """A base model (None: the default) and `count` freshly initialised adapters under `folder`."""
    import torch

    from softprompt import PromptTuningConfig, SoftPromptModel
    from softprompt.base_models import load_model

    if tiny:
        from tests.test_serve_support import build_served_folder

        model_dir, adapters = build_served_folder(folder)
        names = sorted(p.name for p in adapters.iterdir())
        for i in range(len(names), count):  # more copies with other names
            shutil.copytree(adapters / names[i % len(names)], adapters / f"extra{i}")
        return str(model_dir), adapters
    base, _ = load_model(None)
    adapters = folder / "adapters"
    for i in range(count):
        torch.manual_seed(i)
        cfg = PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=20, tokenizer_name_or_path="unused"
        )
        model = SoftPromptModel(base, cfg, f"a{i}", trainable=False)
        model.save_pretrained(adapters / f"a{i}", selected_adapters=[f"a{i}"])
        model.unload()
    return None, adapters


async def load_level(
    url: str,
    models: list[str],
    prompts: list[str],
    n: int,
    concurrency: int,
    rate: float | None,
    max_tokens: int,
    seed: int,
) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(
        base_url=url + "/v1", api_key=os.environ.get("SOFTPROMPT_API_KEY", "x"), max_retries=0, timeout=600
    )
    rng = random.Random(seed)
    arrivals, t = [], 0.0
    for _ in range(n):
        arrivals.append(t)
        t += rng.expovariate(rate) if rate else 0.0
    gate = asyncio.Semaphore(concurrency)
    ttft, latency, tokens, errors = [], [], [], []
    start = time.perf_counter()

    async def one(i: int) -> None:
        await asyncio.sleep(max(0.0, arrivals[i] - (time.perf_counter() - start)))
        async with gate:
            t0 = time.perf_counter()
            first, count = None, 0
            try:
                stream = await client.completions.create(
                    model=models[i % len(models)],
                    prompt=prompts[i % len(prompts)],
                    max_tokens=max_tokens,
                    temperature=0,
                    stream=True,
                    stream_options={"include_usage": True},
                )
                async for chunk in stream:
                    if first is None and chunk.choices:
                        first = time.perf_counter() - t0
                    if chunk.usage is not None:
                        count = chunk.usage.completion_tokens
            except Exception as err:  # noqa: BLE001  (counted and reported)
                errors.append(f"{type(err).__name__}: {err}"[:200])
                return
            ttft.append(first or 0.0)
            latency.append(time.perf_counter() - t0)
            tokens.append(count)

    await asyncio.gather(*(one(i) for i in range(n)))
    wall = time.perf_counter() - start
    await client.close()
    return {
        "concurrency": concurrency,
        "requests": n,
        "errors": len(errors),
        "error_samples": errors[:3],
        "wall_s": wall,
        "tokens": sum(tokens),
        "throughput_tok_s": sum(tokens) / wall,
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "latency_p50_s": percentile(latency, 50),
        "latency_p99_s": percentile(latency, 99),
    }


def sequential_baselines(
    model_name: str | None, adapters: Path, names: list[str], prompts: list[str], n: int, max_tokens: int
) -> dict:
    """One request at a time in-process: softprompt's generate, and PEFT's."""
    import torch

    from softprompt import SoftPromptModel
    from softprompt.base_models import load_model

    base, tok = load_model(model_name)
    out = {}
    model = SoftPromptModel.from_pretrained(base, adapters / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters / name, name)
    model.eval()
    t0, count = time.perf_counter(), 0
    for i in range(n):
        ids = torch.tensor([tok(prompts[i % len(prompts)], add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            g = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                adapter_names=[names[i % len(names)]],
                max_new_tokens=max_tokens,
                do_sample=False,
                min_new_tokens=max_tokens,
            )
        count += g.shape[1] - ids.shape[1]
    wall = time.perf_counter() - t0
    out["softprompt_one_at_a_time"] = {
        "requests": n,
        "tokens": count,
        "wall_s": wall,
        "throughput_tok_s": count / wall,
    }
    base = model.unload()
    try:
        import peft

        peft_model = peft.PeftModel.from_pretrained(base, str(adapters / names[0]), adapter_name=names[0])
        for name in names[1:]:
            peft_model.load_adapter(str(adapters / name), adapter_name=name)
        peft_model.eval()
        t0, count = time.perf_counter(), 0
        for i in range(n):
            peft_model.set_adapter(names[i % len(names)])
            ids = torch.tensor([tok(prompts[i % len(prompts)], add_special_tokens=False)["input_ids"]])
            with torch.no_grad():
                g = peft_model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=max_tokens,
                    do_sample=False,
                    min_new_tokens=max_tokens,
                )
            count += max_tokens  # min_new_tokens forces exactly max_tokens
        wall = time.perf_counter() - t0
        out["peft_one_at_a_time"] = {
            "requests": n,
            "tokens": count,
            "wall_s": wall,
            "throughput_tok_s": count / wall,
            "note": "PEFT's prompt-tuning generate is wrong with transformers 5 "
            "(speed only; its tokens are not the prompt's)",
        }
    except Exception as err:  # noqa: BLE001  (reported instead of the figure)
        out["peft_one_at_a_time"] = {"error": f"{type(err).__name__}: {err}"[:300]}
    return out


def start_server(model: str | None, adapters: Path, batch: int, log: Path) -> tuple[subprocess.Popen, str]:
    from tests.test_serve_support import free_port

    port = free_port()
    args = [
        sys.executable,
        "-m",
        "softprompt",
        "serve",
        "--adapters",
        str(adapters),
        "--port",
        str(port),
        "--max-batch-size",
        str(batch),
        "--max-queue",
        "4096",
    ]
    if model:
        args += ["--model", model]
    proc = subprocess.Popen(args, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited; see {log}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise TimeoutError("the server did not become ready")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default=None, help="Use a running server instead of starting one.")
    p.add_argument(
        "--models", nargs="*", default=None, help="Model names to spread requests over (with --url)."
    )
    p.add_argument(
        "--tiny", action="store_true", help="A tiny random model (a quick check that it all runs)."
    )
    p.add_argument("--adapters-count", type=int, default=8)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=32, help="Requests per concurrency level.")
    p.add_argument(
        "--rate", type=float, default=None, help="Open-loop arrivals per second (default: all at once)."
    )
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument(
        "--baseline-requests", type=int, default=8, help="Requests for the one-at-a-time loops (0: none)."
    )
    p.add_argument("--name", default=None)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    prompts = TINY_PROMPTS if args.tiny else PROMPTS
    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    proc = None
    try:
        model_name, adapters = (None, None)
        if args.url:
            url, models = args.url, args.models or []
        else:
            model_name, adapters = make_adapters(work, args.adapters_count, args.tiny)
            models = sorted(x.name for x in adapters.iterdir())[: args.adapters_count]
            proc, url = start_server(model_name, adapters, args.max_batch_size, work / "server.log")
        # warm-up, not measured: every adapter's prompt KV, the client's first-call costs
        asyncio.run(load_level(url, models, prompts, len(models), len(models), None, 2, 0))
        levels = []
        for c in args.concurrency:
            level = asyncio.run(
                load_level(url, models, prompts, args.requests, c, args.rate, args.max_tokens, 0)
            )
            print(json.dumps(level), flush=True)
            levels.append(level)
        if proc is not None:
            proc.terminate()
            proc.wait(60)
            proc = None
        baselines = {}
        if args.baseline_requests and adapters is not None:
            baselines = sequential_baselines(
                model_name, adapters, models, prompts, args.baseline_requests, args.max_tokens
            )
            print(json.dumps(baselines), flush=True)
        name = args.name or (
            "tiny" if args.tiny else (model_name or "SmolLM2-135M-Instruct").replace("/", "_")
        )
        write_results(name, vars(args), models, levels, baselines)
    finally:
        if proc is not None:
            proc.kill()
        shutil.rmtree(work, ignore_errors=True)


def write_results(name: str, args: dict, models: list[str], levels: list[dict], baselines: dict) -> None:
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"serve-{name}"
    data = {
        "args": args,
        "adapters": len(models),
        "levels": levels,
        "baselines": baselines,
        "cpu_count": os.cpu_count(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    stem.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")

    def fmt(v):
        return "-" if v is None else f"{v:.3f}"

    arrivals = f"open-loop at {args['rate']}/s" if args["rate"] else "all at once"
    lines = [
        f"# softprompt serve load test ({name})",
        "",
        (
            f"{len(models)} adapters, {args['max_tokens']} tokens per request, {args['requests']} requests "
            f"per level, arrivals {arrivals}, {os.cpu_count()} CPUs."
        ),
        "",
        (
            "| concurrency | tokens/s | TTFT p50 (s) | TTFT p99 (s) | latency p50 (s) | latency p99 (s) "
            "| errors |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for lv in levels:
        lines.append(
            f"| {lv['concurrency']} | {lv['throughput_tok_s']:.1f} | {fmt(lv['ttft_p50_s'])} "
            f"| {fmt(lv['ttft_p99_s'])} "
            f"| {fmt(lv['latency_p50_s'])} | {fmt(lv['latency_p99_s'])} | {lv['errors']} |"
        )
    if baselines:
        lines += ["", "| one request at a time (in-process) | tokens/s | note |", "|---|---|---|"]
        for k, v in baselines.items():
            tput = f"{v['throughput_tok_s']:.1f}" if "throughput_tok_s" in v else "-"
            lines.append(f"| {k} | {tput} | {v.get('note') or v.get('error') or ''} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [lv["concurrency"] for lv in levels]
        ax.plot(xs, [lv["throughput_tok_s"] for lv in levels], "o-", label="throughput (tokens/s)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel("tokens/s")
        ax2 = ax.twinx()
        ax2.plot(xs, [lv["latency_p99_s"] or 0 for lv in levels], "s--", color="C1", label="p99 latency (s)")
        ax2.set_ylabel("p99 latency (s)")
        fig.legend(loc="upper left")
        fig.tight_layout()
        fig.savefig(stem.with_suffix(".png"), dpi=100)
    except ImportError:
        pass
    print(f"wrote {stem}.json/.md/.png")


if __name__ == "__main__":
    main()
