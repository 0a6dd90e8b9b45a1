"""Load test of `softprompt serve`: C concurrent clients over K adapters, open-loop arrivals.

Starts a server (or uses `--url`), sends `--requests` streamed completions per
concurrency level with the async `openai` client (fixed prompts, fixed `max_tokens`,
greedy), and reports throughput (generated tokens/s), p50/p99 time to first token and
latency, and errors. For comparison, the same prompts one request at a time in-process:
through softprompt (`SoftPromptModel.generate`) and through PEFT prompt tuning - the
loop a user writes today (PEFT's generate is also wrong with transformers 5: its tokens
are reported, not trusted). `--transformers-serve` also runs the same load against
`transformers serve` (continuous batching on) and softprompt serve, both on the bare
default model; `--against-bare` runs the adapters mixed and the bare model on one server,
interleaved. `--cache-holds N` gives the server a prompt-KV budget that holds N
adapters' KV; `--pick random` draws each request's adapter at random; `--miss-cost`
times one prompt-KV miss (computing it) against a hit, in-process.

    python bench/serve_load.py --tiny --concurrency 1 4 16          # seconds, a tiny model
    python bench/serve_load.py --adapters-count 8 --concurrency 1 8 32 64 --requests 128
    python bench/serve_load.py --adapters-count 1000 --cache-holds 100 --pick random --miss-cost
    python bench/serve_load.py --transformers-serve --concurrency 1 8 32
    python bench/serve_load.py --against-bare --rounds 2 --concurrency 1 16 64 --requests 128
    python bench/serve_load.py --vllm-python .venv-vllm/bin/python --transformers-serve --rounds 2

Writes bench/results/serve-<name>.json, .md and .png. Nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
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


def make_adapters(folder: Path, count: int, tiny: bool, tokens: int = 20) -> tuple[str | None, Path]:
    """A base model (None: the default) and `count` freshly initialised adapters of `tokens`
    virtual tokens under `folder`."""
    import torch

    from softprompt import PromptTuningConfig, SoftPromptModel
    from softprompt.base_models import load_model

    if tiny:
        from tests.test_serve_support import build_served_folder

        model_dir, adapters = build_served_folder(folder)
        names = sorted(p.name for p in adapters.iterdir())
        for i in range(len(names), count):  # copies of sst (4 virtual tokens) with other names
            shutil.copytree(adapters / "sst", adapters / f"extra{i}")
        return str(model_dir), adapters
    base, _ = load_model(None)
    adapters = folder / "adapters"
    for i in range(min(count, 8)):
        torch.manual_seed(i)
        cfg = PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=tokens, tokenizer_name_or_path="unused"
        )
        model = SoftPromptModel(base, cfg, f"a{i}", trainable=False)
        model.save_pretrained(adapters / f"a{i}", selected_adapters=[f"a{i}"])
        model.unload()
    for i in range(8, count):  # copies under other names: served, cached and evicted separately
        shutil.copytree(adapters / f"a{i % 8}", adapters / f"a{i}")
    return None, adapters


def prompt_kv_counters(url: str) -> dict[str, float]:
    """The server's prompt-KV hits, misses, evictions (from /metrics; empty for other servers)."""
    import httpx

    try:
        text = httpx.get(url + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    out = {}
    for line in text.splitlines():
        if line.startswith("softprompt_prompt_kv{"):
            what = line.split('what="', 1)[1].split('"', 1)[0]
            out[what] = float(line.rsplit(" ", 1)[1])
    return out


def state_bytes_per_adapter(model_name: str | None, adapters: Path, name: str) -> int:
    """Bytes one adapter's prompt KV takes in the server's cache (measured, not estimated)."""
    import torch

    from softprompt import SoftPromptModel
    from softprompt.base_models import load_model

    base, _ = load_model(model_name)
    model = SoftPromptModel.from_pretrained(base, adapters / name, adapter_name=name).eval()
    with torch.no_grad():
        model.prompt_cache_for([name], base.get_input_embeddings().weight.dtype)
    return model.prompt_kv.nbytes


def miss_cost(model_name: str | None, adapters: Path, name: str, repeats: int = 10) -> dict:
    """In-process: seconds to compute one adapter's prompt KV (a miss) and to reuse it (a hit)."""
    import torch

    from softprompt import SoftPromptModel
    from softprompt.base_models import load_model

    base, _ = load_model(model_name)
    model = SoftPromptModel.from_pretrained(base, adapters / name, adapter_name=name).eval()
    dtype = base.get_input_embeddings().weight.dtype
    store = model.prompt_kv
    miss, hit = [], []
    with torch.no_grad():
        model.prompt_cache_for([name], dtype)  # warm-up
        for _ in range(repeats):
            store.evict(name)
            t0 = time.perf_counter()
            model.prompt_cache_for([name], dtype)
            miss.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            model.prompt_cache_for([name], dtype)
            hit.append(time.perf_counter() - t0)
    return {
        "virtual_tokens": model.prompts[name].num_virtual_tokens,
        "state_bytes": store.nbytes,
        "miss_ms_p50": 1000 * percentile(miss, 50),
        "hit_ms_p50": 1000 * percentile(hit, 50),
        "repeats": repeats,
        "note": "prompt_cache_for for one row: a miss runs the prompt through the model; a hit "
        "checks the prompt is unchanged and builds the cache object from the kept tensors",
    }


def picked(models: list[str], n: int, pick: str, seed: int) -> list[str]:
    """Each request's model: in turn (`cycle`) or drawn at random, the same for a given seed."""
    if pick == "cycle":
        return [models[i % len(models)] for i in range(n)]
    return random.Random(seed + 1).choices(models, k=n)


def level_requests(args: argparse.Namespace, concurrency: int) -> int:
    """Requests at one level: `--requests`, or `--per-client` per client up to `--requests`."""
    if not args.per_client:
        return args.requests
    return max(concurrency, min(args.requests, args.per_client * concurrency))


async def load_level(
    url: str,
    models: list[str],
    prompts: list[str],
    n: int,
    concurrency: int,
    rate: float | None,
    max_tokens: int,
    seed: int,
    pick: str = "cycle",
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
    picks = picked(models, n, pick, seed)
    gate = asyncio.Semaphore(concurrency)
    ttft, latency, tokens, errors = [], [], [], []
    start = time.perf_counter()

    async def one(i: int) -> None:
        await asyncio.sleep(max(0.0, arrivals[i] - (time.perf_counter() - start)))
        async with gate:
            t0 = time.perf_counter()
            first, count, chunks = None, None, 0
            try:
                stream = await client.completions.create(
                    model=picks[i],
                    prompt=prompts[i % len(prompts)],
                    max_tokens=max_tokens,
                    temperature=0,
                    stream=True,
                    stream_options={"include_usage": True},
                )
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].text:
                        chunks += 1
                        if first is None:
                            first = time.perf_counter() - t0
                    if chunk.usage is not None:
                        count = chunk.usage.completion_tokens
            except Exception as err:  # noqa: BLE001  (counted and reported)
                errors.append(f"{type(err).__name__}: {err}"[:200])
                return
            ttft.append(first or 0.0)
            latency.append(time.perf_counter() - t0)
            tokens.append(count if count is not None else chunks)  # a chunk a token without usage

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


def _timed_requests(n: int, one: Callable[[int], int]) -> dict:
    """Requests 0..n-1 made one after the other by `one(i)` (which returns the tokens it
    generated): their count, tokens, wall time and tokens per second."""
    t0, count = time.perf_counter(), 0
    for i in range(n):
        count += one(i)
    wall = time.perf_counter() - t0
    return {"requests": n, "tokens": count, "wall_s": wall, "throughput_tok_s": count / wall}


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

    def ours(i: int) -> int:
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
        return g.shape[1] - ids.shape[1]

    out["softprompt_one_at_a_time"] = _timed_requests(n, ours)
    base = model.unload()
    try:
        import peft

        peft_model = peft.PeftModel.from_pretrained(base, str(adapters / names[0]), adapter_name=names[0])
        for name in names[1:]:
            peft_model.load_adapter(str(adapters / name), adapter_name=name)
        peft_model.eval()

        def theirs(i: int) -> int:
            peft_model.set_adapter(names[i % len(names)])
            ids = torch.tensor([tok(prompts[i % len(prompts)], add_special_tokens=False)["input_ids"]])
            with torch.no_grad():
                peft_model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=max_tokens,
                    do_sample=False,
                    min_new_tokens=max_tokens,
                )
            return max_tokens  # min_new_tokens forces exactly max_tokens

        out["peft_one_at_a_time"] = {
            **_timed_requests(n, theirs),
            "note": "PEFT's prompt-tuning generate is wrong with transformers 5 "
            "(speed only; its tokens are not the prompt's)",
        }
    except Exception as err:  # noqa: BLE001  (reported instead of the figure)
        out["peft_one_at_a_time"] = {"error": f"{type(err).__name__}: {err}"[:300]}
    return out


def start_server(
    model: str | None,
    adapters: Path,
    batch: int,
    log: Path,
    prompt_cache_mb: float | None = None,
    extra_args: tuple[str, ...] = (),
) -> tuple[subprocess.Popen, str]:
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
    if prompt_cache_mb is not None:
        args += ["--prompt-cache-mb", str(prompt_cache_mb)]
    args += list(extra_args)
    return _wait_ready(subprocess.Popen(args, stdout=log.open("wb"), stderr=subprocess.STDOUT), port)


def start_transformers_serve(model_dir: str, log: Path) -> tuple[subprocess.Popen, str]:
    """`transformers serve` on a local model folder, continuous batching on, on the CPU."""
    from tests.test_serve_support import free_port

    port = free_port()
    exe = Path(sys.executable).with_name("transformers")
    args = [str(exe), "serve", model_dir, "--continuous-batching", "--device", "cpu"]
    args += ["--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return _wait_ready(subprocess.Popen(args, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env), port)


def _wait_ready(proc: subprocess.Popen, port: int) -> tuple[subprocess.Popen, str]:
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}); see its log")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise TimeoutError("the server did not become ready")


def warm_up(url: str, models: list[str], prompts: list[str], args: argparse.Namespace) -> None:
    """Requests before the measured levels (not measured): the adapters the levels use, warmed
    as `--warm` says, so a level times serving, not first-use costs."""
    chosen = {m for c in args.concurrency for m in picked(models, level_requests(args, c), args.pick, 0)}
    if args.warm == "first":
        warm = models if args.warmup is None else models[: args.warmup]
    else:  # the adapters the levels will use; "evicted": then enough others to push them out
        warm = [m for m in models if m in chosen]
        if args.warm == "evicted":
            warm += [m for m in models if m not in chosen][: args.cache_holds or 0]
    if warm:
        asyncio.run(load_level(url, warm, prompts, len(warm), min(len(warm), 64), None, 1, 0))


def run_level(
    url: str, target: str, models: list[str], prompts: list[str], args: argparse.Namespace, c: int, out: list
) -> dict:
    """One concurrency level against one server, appended to `out` (and the results files
    rewritten) as soon as it ends."""
    before, load_before = prompt_kv_counters(url), os.getloadavg()[0]
    level = asyncio.run(
        load_level(url, models, prompts, level_requests(args, c), c, args.rate, args.max_tokens, 0, args.pick)
    )
    after = prompt_kv_counters(url)
    level["target"] = target
    level["load_average"] = [load_before, os.getloadavg()[0]]
    if before and after:
        level["prompt_kv"] = {k: after[k] - before.get(k, 0) for k in ("hits", "misses", "evictions")}
        level["prompt_kv"]["entries"] = after.get("entries")
    print(json.dumps(level), flush=True)
    out.append(level)
    args.write(out)
    return level


def run_levels(
    url: str, target: str, models: list[str], prompts: list[str], args: argparse.Namespace, out: list
) -> None:
    """The warm-up, then every concurrency level against one server."""
    warm_up(url, models, prompts, args)
    for c in args.concurrency:
        run_level(url, target, models, prompts, args, c, out)


def run_interleaved(
    servers: list[tuple[str, str, list[str]]], prompts: list[str], args: argparse.Namespace, out: list
) -> None:
    """The same levels against several running servers (target, url, models), interleaved so
    that a machine whose speed drifts during the run favours none of them: every level runs
    on each server in turn, in the opposite order every other round (A B, then B A), for
    `--rounds` rounds. Each level records its round. Before the first round each server runs
    the busiest level once, unmeasured, so neither pays its first batch's growth in a round."""
    top = max(args.concurrency)
    for _, url, models in servers:  # then the busiest level once, unmeasured: batch buffers, allocator
        warm_up(url, models, prompts, args)
        asyncio.run(load_level(url, models, prompts, top, top, None, args.max_tokens, 1))
    for r in range(args.rounds):
        for c in args.concurrency:
            for target, url, models in servers if r % 2 == 0 else servers[::-1]:
                run_level(url, target, models, prompts, args, c, out)
                out[-1]["round"] = r
        args.write(out)


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
    p.add_argument("--virtual-tokens", type=int, default=20, help="Each adapter's prompt length.")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=32, help="Requests per concurrency level.")
    p.add_argument(
        "--rate", type=float, default=None, help="Open-loop arrivals per second (default: all at once)."
    )
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--pick", choices=["cycle", "random"], default="cycle", help="How requests pick adapters.")
    p.add_argument("--warmup", type=int, default=None, help="Adapters warmed up first (default: all).")
    p.add_argument(
        "--warm",
        choices=["first", "picked", "evicted"],
        default="first",
        help="Warm the first --warmup adapters, those the levels pick, or those then --cache-holds others.",
    )
    p.add_argument("--per-client", type=int, default=None, help="Requests per client, up to --requests.")
    p.add_argument("--bare-only", action="store_true", help="With --transformers-serve: no adapter levels.")
    p.add_argument(
        "--vllm-python",
        default=None,
        help="The Python of a vLLM environment (make vllm: .venv-vllm/bin/python): softprompt serve "
        "--engine vllm with the adapters against bare vLLM (and, with --transformers-serve, the built-in "
        "engine and transformers serve), interleaved for --rounds rounds.",
    )
    p.add_argument("--vllm-block-size", type=int, default=32, help="vLLM's KV block (its CPU default: 128).")
    p.add_argument(
        "--against-bare",
        action="store_true",
        help="The adapters mixed and the bare model on the same server, interleaved for --rounds rounds.",
    )
    p.add_argument("--prompt-cache-mb", type=float, default=None, help="The server's prompt-KV budget.")
    p.add_argument(
        "--cache-holds", type=int, default=None, help="A prompt-KV budget that holds this many adapters."
    )
    p.add_argument("--miss-cost", action="store_true", help="Time a prompt-KV miss and hit in-process.")
    p.add_argument(
        "--transformers-serve",
        action="store_true",
        help="Also the bare model through softprompt serve and through `transformers serve`.",
    )
    p.add_argument(
        "--padded-too",
        action="store_true",
        help="With --transformers-serve: also the bare model through softprompt serve --padded-batches.",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="With --transformers-serve or --against-bare: every level runs on each target in turn, "
        "this many rounds, the order reversed every other round.",
    )
    p.add_argument(
        "--baseline-requests", type=int, default=8, help="Requests for the one-at-a-time loops (0: none)."
    )
    p.add_argument("--name", default=None)
    p.add_argument("--note", default="", help="A line for the markdown report (e.g. the machine's load).")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-up below (the servers)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    prompts = TINY_PROMPTS if args.tiny else PROMPTS
    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    proc = None
    others: list[subprocess.Popen] = []  # the servers compared with ours (--transformers-serve)
    extra: dict = {}
    levels: list = []
    models: list[str] = []
    name = args.name or ("tiny" if args.tiny else "SmolLM2-135M-Instruct")
    args.write = lambda out, baselines=None: write_results(
        name, vars(args), models, out, baselines or {}, extra
    )
    try:
        model_name, adapters = (None, None)
        if args.url:
            url, models = args.url, args.models or []
            run_levels(url, "given server", models, prompts, args, levels)
        else:
            model_name, adapters = make_adapters(work, args.adapters_count, args.tiny, args.virtual_tokens)
            models = sorted(x.name for x in adapters.iterdir())[: args.adapters_count]
            budget = args.prompt_cache_mb
            if args.cache_holds:
                per = state_bytes_per_adapter(model_name, adapters, models[0])
                budget = (args.cache_holds + 0.5) * per / 2**20
                extra["prompt_kv_budget"] = {
                    "holds": args.cache_holds,
                    "bytes_per_adapter": per,
                    "mb": budget,
                }
            if args.miss_cost:
                extra["miss_cost"] = miss_cost(model_name, adapters, models[0])
                print(json.dumps(extra["miss_cost"]), flush=True)
            t0 = time.perf_counter()
            proc, url = start_server(model_name, adapters, args.max_batch_size, work / "server.log", budget)
            extra["server_start_s"] = time.perf_counter() - t0
            if args.vllm_python:
                run_vllm(args, model_name, adapters, models, prompts, work, levels, extra, others, url)
            elif args.against_bare and not args.transformers_serve:
                from softprompt.base_models import DEFAULT_MODEL

                mixed = (f"softprompt serve, {len(models)} adapters", url, models)
                run_interleaved([mixed, ("softprompt serve, bare model", url, [model_name or DEFAULT_MODEL])],
                                prompts, args, levels)  # fmt: skip
            elif not (args.bare_only and args.transformers_serve):
                run_levels(url, f"softprompt serve, {len(models)} adapters", models, prompts, args, levels)
            if args.transformers_serve and not args.vllm_python:
                from softprompt.base_models import DEFAULT_MODEL, default_model_dir

                base_id = model_name or DEFAULT_MODEL
                servers = [("softprompt serve, bare model", url, [base_id])]
                if args.padded_too:
                    log = work / "server-padded.log"
                    more, padded_url = start_server(
                        model_name, adapters, args.max_batch_size, log, budget, ("--padded-batches",)
                    )
                    others.append(more)
                    servers.append(("softprompt serve --padded-batches, bare model", padded_url, [base_id]))
                folder = model_name or str(default_model_dir())
                try:
                    theirs, their_url = start_transformers_serve(folder, work / "transformers-serve.log")
                    others.append(theirs)
                    servers.append(("transformers serve, bare model", their_url, [folder]))
                except Exception as err:  # noqa: BLE001  (reported instead of the figures)
                    log = (work / "transformers-serve.log").read_text(errors="replace")[-1500:]
                    extra["transformers_serve_error"] = f"{type(err).__name__}: {err}\n{log}"
                    print(extra["transformers_serve_error"], flush=True)
                run_interleaved(servers, prompts, args, levels)
        for server in [proc, *others] if proc is not None else others:
            server.terminate()
            server.wait(60)
        proc, others = None, []
        baselines = {}
        if args.baseline_requests and adapters is not None:
            baselines = sequential_baselines(
                model_name, adapters, models, prompts, args.baseline_requests, args.max_tokens
            )
            print(json.dumps(baselines), flush=True)
        args.write(levels, baselines)
    finally:
        for server in [proc, *others] if proc is not None else others:
            server.kill()
        shutil.rmtree(work, ignore_errors=True)


def run_vllm(
    args: argparse.Namespace,
    model_name: str | None,
    adapters: Path,
    models: list[str],
    prompts: list[str],
    work: Path,
    levels: list,
    extra: dict,
    others: list,
    builtin_url: str,
) -> None:
    """`--vllm-python`: one vLLM (prompt embeddings on) and `softprompt serve --engine vllm` in
    front of it, interleaved: the adapters mixed through the front, the bare model sent to vLLM
    as token ids, and (with --transformers-serve) the built-in engine with the same adapters and
    `transformers serve`; vLLM's prefix-cache counters and every process's RSS are recorded."""
    from softprompt.base_models import default_model_dir
    from softprompt.serve.vllm_process import start_vllm

    folder = model_name or str(default_model_dir())
    t0 = time.perf_counter()
    vllm, vllm_api = start_vllm(
        args.vllm_python, folder, work / "vllm.log", served_name="vllm-bare", dtype="float32",
        max_model_len=2048, block_size=args.vllm_block_size,
        extra=["--max-num-seqs", str(args.max_batch_size)],
    )  # fmt: skip
    others.append(vllm)
    extra["vllm_start_s"] = time.perf_counter() - t0
    front, front_url = start_server(
        model_name, adapters, args.max_batch_size, work / "front.log", None,
        ("--engine", "vllm", "--vllm-url", vllm_api, "--vllm-model", "vllm-bare"),
    )  # fmt: skip
    others.append(front)
    vllm_url = vllm_api.removesuffix("/v1")
    servers = [
        (f"softprompt serve --engine vllm, {len(models)} adapters", front_url, models),
        ("vLLM, bare model (token ids)", vllm_url, ["vllm-bare"]),
    ]
    if args.transformers_serve:
        servers.append((f"softprompt serve --engine builtin, {len(models)} adapters", builtin_url, models))
        theirs, their_url = start_transformers_serve(folder, work / "transformers-serve.log")
        others.append(theirs)
        servers.append(("transformers serve, bare model", their_url, [folder]))
    before = vllm_prefix_counters(vllm_url)
    run_interleaved(servers, prompts, args, levels)
    after = vllm_prefix_counters(vllm_url)
    extra["vllm_prefix_cache"] = {"before": before, "after": after, "block_size": args.vllm_block_size}
    extra["rss_mb"] = {
        "vllm (api server + engine core)": rss_mb(vllm.pid, children=True),
        "softprompt front": rss_mb(front.pid),
    }
    print(json.dumps({k: extra[k] for k in ("vllm_prefix_cache", "rss_mb")}), flush=True)


def vllm_prefix_counters(url: str) -> dict[str, float]:
    """vLLM's prefix-cache counters (tokens queried, tokens found), summed over its engines."""
    import re

    import httpx

    text = httpx.get(url + "/metrics", timeout=30).text
    out = {}
    for name in ("queries", "hits"):
        found = re.findall(rf"^vllm:prefix_cache_{name}_total\{{[^}}]*\}} ([0-9.e+]+)$", text, re.MULTILINE)
        out[name] = sum(float(v) for v in found)
    return out


def rss_mb(pid: int, children: bool = False) -> float:
    """Resident memory of a process (and its children), from /proc, in MB."""
    pids = [pid]
    if children:
        for task in Path(f"/proc/{pid}/task").iterdir():
            kids = (task / "children").read_text().split() if (task / "children").exists() else []
            pids += [int(k) for k in kids]
    total = 0
    for p in pids:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


def rounds_summary(levels: list[dict]) -> list[str]:
    """Markdown lines comparing the first server of interleaved rounds (`--rounds`) with each
    other one, level by level: medians over the rounds, the range of the throughput ratio, and
    in how many rounds the first server's p99 latency was the higher (empty without rounds)."""
    rounds = [lv for lv in levels if "round" in lv]
    if not rounds or max(lv["round"] for lv in rounds) == 0:
        return []
    targets = list(dict.fromkeys(lv["target"] for lv in rounds))
    ours, lines = targets[0], []
    lines += [
        "",
        f"Interleaved rounds: {ours} against each other server, medians over the rounds.",
        "",
        (
            "| against | concurrency | rounds | throughput ratio (median, range) "
            "| latency p99, ours / theirs (s) | rounds where our p99 was higher |"
        ),
        "|---|---|---|---|---|---|",
    ]
    for other in targets[1:]:
        for c in dict.fromkeys(lv["concurrency"] for lv in rounds):
            pairs = []
            for r in sorted({lv["round"] for lv in rounds}):
                a = [lv for lv in rounds if (lv["target"], lv["concurrency"], lv["round"]) == (ours, c, r)]
                b = [lv for lv in rounds if (lv["target"], lv["concurrency"], lv["round"]) == (other, c, r)]
                if a and b and a[0]["latency_p99_s"] is not None and b[0]["latency_p99_s"] is not None:
                    pairs.append((a[0], b[0]))
            if not pairs:
                continue
            ratios = [a["throughput_tok_s"] / b["throughput_tok_s"] for a, b in pairs]
            higher = sum(a["latency_p99_s"] > b["latency_p99_s"] for a, b in pairs)
            lines.append(
                f"| {other} | {c} | {len(pairs)} | {statistics.median(ratios):.2f} "
                f"({min(ratios):.2f}-{max(ratios):.2f}) "
                f"| {statistics.median(a['latency_p99_s'] for a, _ in pairs):.3f} / "
                f"{statistics.median(b['latency_p99_s'] for _, b in pairs):.3f} | {higher} of {len(pairs)} |"
            )
    return lines


def write_results(
    name: str, args: dict, models: list[str], levels: list[dict], baselines: dict, extra: dict
) -> None:
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"serve-{name}"
    data = {
        "args": {k: v for k, v in args.items() if k != "write"},
        "adapters": len(models),
        "levels": levels,
        "baselines": baselines,
        **extra,
        "load_average_at_end": os.getloadavg(),
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
            f"{len(models)} adapters (picked: {args['pick']}), {args['max_tokens']} tokens per request, "
            f"up to {args['requests']} requests per level, arrivals {arrivals}, {os.cpu_count()} CPUs, load "
            f"average {os.getloadavg()[0]:.1f} at the end (a machine shared with other jobs)."
        ),
        "",
    ]
    if args.get("note"):
        lines += [args["note"], ""]
    if "prompt_kv_budget" in extra:
        b = extra["prompt_kv_budget"]
        lines += [
            (
                f"Prompt-KV budget: {b['mb']:.1f} MB, room for {b['holds']} adapters' KV "
                f"({b['bytes_per_adapter']} bytes each)."
            ),
            "",
        ]
    if "miss_cost" in extra:
        m = extra["miss_cost"]
        lines += [
            (
                f"One prompt-KV miss ({m['virtual_tokens']} virtual tokens, computed): "
                f"{m['miss_ms_p50']:.2f} ms; a hit: {m['hit_ms_p50']:.3f} ms "
                f"(medians of {m['repeats']}, in-process)."
            ),
            "",
        ]
    if "vllm_prefix_cache" in extra:
        v = extra["vllm_prefix_cache"]
        hits = v["after"].get("hits", 0) - v["before"].get("hits", 0)
        queries = v["after"].get("queries", 0) - v["before"].get("queries", 0)
        lines += [
            (
                f"vLLM (block size {v['block_size']}) started in {extra.get('vllm_start_s', 0):.0f} s; its "
                f"prefix cache in the rounds: {hits:.0f} of {queries:.0f} prompt tokens cached."
            ),
            "",
        ]
    if "rss_mb" in extra:
        lines += [
            "Resident memory at the end: " + ", ".join(f"{k} {v:.0f} MB" for k, v in extra["rss_mb"].items()),
            "",
        ]
    if "transformers_serve_error" in extra:
        lines += ["`transformers serve` failed: " + extra["transformers_serve_error"].splitlines()[0], ""]
    lines += [
        (
            "| server | concurrency | requests | tokens/s | TTFT p50 (s) | TTFT p99 (s) | latency p50 (s) "
            "| latency p99 (s) | errors | prompt-KV hits/misses/evictions |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for lv in levels:
        kv = lv.get("prompt_kv")
        kv_text = f"{kv['hits']:.0f}/{kv['misses']:.0f}/{kv['evictions']:.0f}" if kv else "-"
        when = f" (round {lv['round'] + 1})" if "round" in lv else ""
        lines.append(
            f"| {lv.get('target', '')}{when} "
            f"| {lv['concurrency']} | {lv['requests']} "
            f"| {lv['throughput_tok_s']:.1f} "
            f"| {fmt(lv['ttft_p50_s'])} | {fmt(lv['ttft_p99_s'])} "
            f"| {fmt(lv['latency_p50_s'])} | {fmt(lv['latency_p99_s'])} | {lv['errors']} | {kv_text} |"
        )
    lines += rounds_summary(levels)
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

        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        for i, target in enumerate(dict.fromkeys(lv.get("target", "") for lv in levels)):
            mine = [lv for lv in levels if lv.get("target", "") == target]
            xs = sorted({lv["concurrency"] for lv in mine})  # a median over the rounds at each level
            at = [[lv for lv in mine if lv["concurrency"] == c] for c in xs]
            tput = [statistics.median(lv["throughput_tok_s"] for lv in a) for a in at]
            p99 = [statistics.median(lv["latency_p99_s"] or 0 for lv in a) for a in at]
            ax.plot(xs, tput, "o-", color=f"C{i}", label=target)
            ax2.plot(xs, p99, "s--", color=f"C{i}", label=target)
        for a, label in ((ax, "throughput (generated tokens/s)"), (ax2, "p99 latency (s)")):
            a.set_xscale("log", base=2)
            a.set_xlabel("concurrent requests")
            a.set_ylabel(label)
            a.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(stem.with_suffix(".png"), dpi=100)
    except ImportError:
        pass
    print(f"wrote {stem}.json/.md/.png")


if __name__ == "__main__":
    main()
