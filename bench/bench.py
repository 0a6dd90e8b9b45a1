"""Benchmark softprompt against PEFT prompt tuning and the bare model, side by side.

Every figure is a ratio of timings taken in the same process, alternating the systems
within each repeat (so drift in machine load hits all of them alike): a warm-up, then the
median of `--repeats` runs. Peak memory is measured per system in a fresh subprocess.

    python bench/bench.py                       # SmolLM2-135M-Instruct, 2 threads
    python bench/bench.py --model gpt2 --quick  # any causal LM, fewer repeats, no scaling

Writes bench/results/<name>.json, <name>.md and <name>.png. This is not a test: nothing
here asserts a timing.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

warnings.filterwarnings("ignore")
logging.getLogger("transformers").setLevel(logging.ERROR)

ROOT = Path(__file__).resolve().parent


# ---------------------------------------------------------------------- set-up
def load_base(name: str | None):
    from softprompt.base_models import load_model

    base, tokenizer = load_model(name)
    return base.eval(), tokenizer


def ordinary_ids(tokenizer, vocab: int) -> torch.Tensor:
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    return torch.tensor([i for i in range(min(vocab, len(tokenizer))) if i not in special])


def random_batch(pool: torch.Tensor, batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = pool[torch.randint(0, len(pool), (batch, length), generator=g)]
    return ids, torch.ones_like(ids)


def ours(base, n: int, names: list[str] | None = None, seed: int = 0):
    from softprompt import PromptTuningConfig, SoftPromptModel

    torch.manual_seed(seed)
    names = names or ["default"]
    cfg = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n, prompt_tuning_init="SAMPLE_VOCAB")
    model = SoftPromptModel(base, cfg, names[0])
    for extra in names[1:]:
        model.add_adapter(extra, cfg)
    return model


def peft_prompt(base, n: int, seed: int = 0):
    import peft

    torch.manual_seed(seed)
    cfg = peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=n, prompt_tuning_init="SAMPLE_VOCAB"
    )
    return peft.get_peft_model(copy.deepcopy(base), cfg)


def peft_lora(base):
    import peft

    cfg = peft.LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    return peft.get_peft_model(copy.deepcopy(base), cfg)


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def alternate(systems: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per system, systems interleaved within every repeat (in reverse order
    on every other repeat, so that running first or last favours no system)."""
    for _ in range(warmup):
        for fn in systems.values():
            fn()
    runs: dict[str, list[float]] = {k: [] for k in systems}
    order = list(systems.items())
    for r in range(repeats):
        for name, fn in order if r % 2 == 0 else order[::-1]:
            runs[name].append(timed(fn))
    return {k: statistics.median(v) for k, v in runs.items()}


# ---------------------------------------------------------------------- measurements
def train_step_fn(model, ids, mask, optimizer, **kwargs):
    def step():
        model.train()
        loss = model(input_ids=ids, attention_mask=mask, labels=ids, **kwargs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def forward_fn(model, ids, mask):
    def fwd():
        model.eval()
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)

    return fwd


def generate_fn(model, ids, mask, new_tokens, **kw):
    def gen():
        model.eval()
        with torch.no_grad():
            return model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                **kw,
            )

    return gen


def bare_train_step_fn(model, ids, mask):
    """The bare model's own training step with gradients for its input embeddings (what a
    prompt's gradient needs at the least, without the prompt): a reference for ours."""

    def step():
        model.train()
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
        model(inputs_embeds=embeds, attention_mask=mask, labels=ids).loss.backward()
        model.eval()

    return step


def optimizer_for(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)


def bench_train(base, pool, n, length, batch, repeats, lora: bool = True) -> dict[str, float]:
    ids, mask = random_batch(pool, batch, length, seed=1)
    mine, theirs = ours(base, n), peft_prompt(base, n)
    systems = {
        "softprompt": train_step_fn(mine, ids, mask, optimizer_for(mine)),
        "peft_prompt_tuning": train_step_fn(theirs, ids, mask, optimizer_for(theirs)),
    }
    if lora:
        lora_model = peft_lora(base)
        systems["peft_lora_r8"] = train_step_fn(lora_model, ids, mask, optimizer_for(lora_model))
    times = alternate(systems, repeats)
    mine.unload()
    return times


def bench_forward(base, pool, n, length, batch, repeats) -> dict[str, float]:
    ids, mask = random_batch(pool, batch, length, seed=2)
    mine, theirs = ours(base, n), peft_prompt(base, n)
    times = alternate(
        {
            "softprompt": forward_fn(mine, ids, mask),
            "peft_prompt_tuning": forward_fn(theirs, ids, mask),
            "bare": forward_fn(base, ids, mask),
        },
        repeats,
    )
    mine.unload()
    return times


def bench_step(base, pool, n, length, batch, repeats) -> dict[str, float]:
    """Our training step against the bare model's no-grad forward on the same batch (the
    step's floor is about 2x: a forward plus a backward that needs input gradients only):
    the default call (logits returned) and the loss-only call the trainer makes
    (`return_logits=False`: the loss fused with the output layer)."""
    ids, mask = random_batch(pool, batch, length, seed=1)
    mine = ours(base, n)
    optimizer = optimizer_for(mine)
    times = alternate(
        {
            "softprompt_train_step": train_step_fn(mine, ids, mask, optimizer),
            "softprompt_train_step_loss_only": train_step_fn(mine, ids, mask, optimizer, return_logits=False),
            "bare_train_step": bare_train_step_fn(base, ids, mask),
            "bare_forward": forward_fn(base, ids, mask),
        },
        repeats,
    )
    mine.unload()
    return times


def bench_bf16(base, pool, n, length, batch, repeats) -> dict[str, Any]:
    """The train step and no-grad forward with the base model loaded in bfloat16."""
    from softprompt.core.bf16 import native_bf16

    base16 = copy.deepcopy(base).to(torch.bfloat16)
    train = bench_train(base16, pool, n, length, batch, repeats, lora=False)
    step = bench_step(base16, pool, n, length, batch, repeats)
    forward = bench_forward(base16, pool, n, length, batch, repeats)
    return {
        "native_bf16": native_bf16(torch.device("cpu")),
        "train_seconds": train,
        "step_seconds": step,
        "forward_seconds": forward,
        "train_peft_over_ours": train["peft_prompt_tuning"] / train["softprompt"],
        "step_over_bare_forward": step["softprompt_train_step"] / step["bare_forward"],
        "loss_only_step_over_bare_forward": step["softprompt_train_step_loss_only"] / step["bare_forward"],
        "forward_ours_over_bare": forward["softprompt"] / forward["bare"],
        "forward_peft_over_bare": forward["peft_prompt_tuning"] / forward["bare"],
    }


def bench_generate(base, pool, n, length, batch, new_tokens, repeats) -> dict[str, Any]:
    ids, mask = random_batch(pool, batch, length, seed=3)
    mine, theirs = ours(base, n), peft_prompt(base, n)
    with torch.no_grad():  # the same prompt in both libraries
        theirs.prompt_encoder["default"].embedding.weight.copy_(mine.prompts["default"].embedding)
    fns = {
        "softprompt": generate_fn(mine, ids, mask, new_tokens),
        "peft_prompt_tuning": generate_fn(theirs, ids, mask, new_tokens),
        "bare": generate_fn(base, ids, mask, new_tokens),
    }
    times = alternate(fns, repeats)
    # Correctness next to speed: the reference is our model without the KV cache, step by step.
    reference = ids.clone()
    with torch.no_grad():
        mine.prefix_cache = False
        eos = base.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        for _ in range(new_tokens):
            logits = mine(input_ids=reference).logits[:, -1]
            logits[:, eos] = float("-inf")  # as min_new_tokens does
            reference = torch.cat([reference, logits.argmax(-1, keepdim=True)], dim=1)
        mine.prefix_cache = True
    out_ours, out_peft = fns["softprompt"](), fns["peft_prompt_tuning"]()
    new_ours = out_ours[:, -new_tokens:]
    new_peft = out_peft[:, -new_tokens:]
    agree = {
        "softprompt_equals_reference": bool(torch.equal(new_ours, reference[:, -new_tokens:])),
        "peft_equals_reference": bool(torch.equal(new_peft, reference[:, -new_tokens:])),
        "peft_output_length": int(out_peft.shape[1]),
    }
    mine.unload()
    tokens = batch * new_tokens
    return {"seconds": times, "tokens_per_s": {k: tokens / v for k, v in times.items()}, "correctness": agree}


def bench_serving(base, pool, n, length, adapters, new_tokens, repeats) -> dict[str, Any]:
    """`adapters` requests, one per adapter: ours in one mixed batch, PEFT one adapter at a time."""
    import peft

    names = [f"task{i}" for i in range(adapters)]
    ids, mask = random_batch(pool, adapters, length, seed=4)
    mine = ours(base, n, names)
    theirs = peft_prompt(base, n)
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(names):
            mine.save_pretrained(Path(tmp) / name, selected_adapters=[name])
            if i == 0:
                theirs = peft.PeftModel.from_pretrained(
                    copy.deepcopy(base), Path(tmp) / name, adapter_name=name
                )
            else:
                theirs.load_adapter(Path(tmp) / name, adapter_name=name)

    def ours_all():
        mine.eval()
        with torch.no_grad():
            mine.generate(
                input_ids=ids,
                attention_mask=mask,
                adapter_names=names,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
            )

    def peft_all():
        theirs.eval()
        with torch.no_grad():
            for i, name in enumerate(names):
                theirs.set_adapter(name)
                theirs.generate(
                    input_ids=ids[i : i + 1],
                    attention_mask=mask[i : i + 1],
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    do_sample=False,
                )

    times = alternate({"softprompt_mixed_batch": ours_all, "peft_one_adapter_at_a_time": peft_all}, repeats)
    mine.unload()
    tokens = adapters * new_tokens
    return {"seconds": times, "tokens_per_s": {k: tokens / v for k, v in times.items()}}


def adapter_sizes(base, n: int) -> dict[str, int]:
    with tempfile.TemporaryDirectory() as tmp:
        mine = ours(base, n)
        mine.save_pretrained(Path(tmp) / "ours")
        mine.unload()
        peft_prompt(base, n).save_pretrained(Path(tmp) / "peft")
        size = lambda folder: sum(
            f.stat().st_size for f in (Path(tmp) / folder).iterdir() if f.suffix in (".json", ".safetensors")
        )
        return {"softprompt": size("ours"), "peft_prompt_tuning": size("peft")}


def memory_child(args: argparse.Namespace) -> None:
    """Run one system's forward + generate + train step and print its peak RSS (MiB)."""
    torch.set_num_threads(args.threads)
    base, tokenizer = load_base(args.model)
    pool = ordinary_ids(tokenizer, base.config.vocab_size)
    ids, mask = random_batch(pool, args.batch, args.length, seed=5)
    system = {
        "softprompt": lambda: ours(base, args.num_virtual_tokens),
        "bare": lambda: base,
        "peft_prompt_tuning": lambda: peft_prompt(base, args.num_virtual_tokens),
    }[args.memory_child]()
    loaded = _status_mib("VmRSS")
    # Loading the model peaks higher than running it; reset the peak (Linux: clear_refs 5)
    # so the figure is the workload's own peak, model weights included.
    try:
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    forward_fn(system, ids, mask)()
    generate_fn(system, ids[:8], mask[:8], 8)()
    if args.memory_child != "bare":
        train_step_fn(system, ids, mask, optimizer_for(system))()
    peak = _status_mib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_rss_mib": peak, "after_load_mib": loaded, "peak_reset_after_load": reset}))


def _status_mib(field: str) -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def bench_memory(args: argparse.Namespace) -> dict[str, float]:
    out = {}
    for system in ("bare", "softprompt", "peft_prompt_tuning"):
        cmd = [
            sys.executable,
            __file__,
            "--memory-child",
            system,
            "--threads",
            str(args.threads),
            "--batch",
            str(args.batch),
            "--length",
            str(args.length),
            "--num-virtual-tokens",
            str(args.num_virtual_tokens),
        ]
        if args.model:
            cmd += ["--model", args.model]
        result = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[system] = json.loads(result.stdout.strip().splitlines()[-1])
    return out


# ---------------------------------------------------------------------- report
def write_report(results: dict[str, Any], out_dir: Path, name: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        f"# softprompt benchmark: {results['meta']['model']}",
        "",
        (
            f"{results['meta']['machine']}, {results['meta']['threads']} threads, "
            f"torch {results['meta']['torch']}, "
            f"transformers {results['meta']['transformers']}, peft {results['meta']['peft']}; median of "
            f"{results['meta']['repeats']} runs after a warm-up, systems alternated. "
            "N = virtual tokens, L = input tokens, B = batch."
        ),
    ]
    for u in results["meta"].get("updates", []):
        lines.append(
            f"Re-measured {u['date']} (median of {u.get('repeats', '?')}): {', '.join(u['sections'])}."
        )
    lines += [
        "",
        "| measurement | softprompt | PEFT prompt tuning | other | ratio | target |",
        "|---|---|---|---|---|---|",
    ]
    t = results.get("train")
    if t:
        lines.append(
            f"| train step (N={t['n']}, L={t['length']}, B={t['batch']}) | "
            f"{t['seconds']['softprompt']:.2f} s | "
            f"{t['seconds']['peft_prompt_tuning']:.2f} s | "
            f"LoRA r=8: {t['seconds'].get('peft_lora_r8', float('nan')):.2f} s | "
            f"PEFT / ours = **{t['peft_over_ours']:.2f}** | >= 1.25 |"
        )
    f = results.get("forward")
    if f:
        lines.append(
            f"| forward, no grad (N={f['n']}, L={f['length']}, B={f['batch']}) | "
            f"{f['seconds']['softprompt']:.3f} s | "
            f"{f['seconds']['peft_prompt_tuning']:.3f} s | bare: {f['seconds']['bare']:.3f} s | "
            f"ours / bare = **{f['ours_over_bare']:.3f}**, "
            f"PEFT / bare = {f['peft_over_bare']:.3f} | <= 1.05 |"
        )
    st = results.get("step")
    if st:
        lines.append(
            f"| train step vs bare forward (N={st['n']}, L={st['length']}, B={st['batch']}) | "
            f"{st['seconds']['softprompt_train_step']:.2f} s | | "
            f"bare forward: {st['seconds']['bare_forward']:.2f} s | "
            f"step / bare forward = **{st['step_over_bare_forward']:.2f}** | <= 2.2 |"
        )
        if "loss_only_step_over_bare_forward" in st:
            lines.append(
                f"| loss-only train step, as the trainer runs it (`return_logits=False`) | "
                f"{st['seconds']['softprompt_train_step_loss_only']:.2f} s | | "
                f"bare forward: {st['seconds']['bare_forward']:.2f} s | "
                f"step / bare forward = **{st['loss_only_step_over_bare_forward']:.2f}** | <= 2.2 |"
            )
        if "bare_step_over_bare_forward" in st:
            lines.append(
                "| the bare model's own train step (input-embedding gradients, no prompt) | | | "
                f"{st['seconds']['bare_train_step']:.2f} s | "
                f"step / bare forward = {st['bare_step_over_bare_forward']:.2f} | (reference) |"
            )
    b = results.get("bf16")
    if b:
        tag = f"bfloat16, N={b['n']}, L={b['length']}, B={b['batch']}"
        lines.append(
            f"| train step ({tag}) | {b['train_seconds']['softprompt']:.2f} s | "
            f"{b['train_seconds']['peft_prompt_tuning']:.2f} s | "
            f"bare forward: {b['step_seconds']['bare_forward']:.2f} s | "
            f"PEFT / ours = **{b['train_peft_over_ours']:.2f}**, "
            f"step / bare forward = {b['step_over_bare_forward']:.2f} | >= 1.25 |"
        )
        lines.append(
            f"| forward, no grad ({tag}) | {b['forward_seconds']['softprompt']:.3f} s | "
            f"{b['forward_seconds']['peft_prompt_tuning']:.3f} s | "
            f"bare: {b['forward_seconds']['bare']:.3f} s | "
            f"ours / bare = **{b['forward_ours_over_bare']:.3f}**, "
            f"PEFT / bare = {b['forward_peft_over_bare']:.3f} | <= 1.05 |"
        )
    g = results.get("generate")
    if g:
        tps = g["tokens_per_s"]
        lines.append(
            f"| greedy generate ({g['new_tokens']} new, B={g['batch']}, L={g['length']}) | "
            f"{tps['softprompt']:.1f} tok/s | "
            f"{tps['peft_prompt_tuning']:.1f} tok/s | bare: {tps['bare']:.1f} tok/s | ours / bare = "
            f"**{g['ours_over_bare']:.3f}**, PEFT / bare = {g['peft_over_bare']:.3f} | >= 0.95 |"
        )
    s = results.get("serving")
    if s:
        tps = s["tokens_per_s"]
        lines.append(
            f"| serving {s['adapters']} adapters, 1 request each ({s['new_tokens']} new) | "
            f"{tps['softprompt_mixed_batch']:.1f} tok/s (one mixed batch) | "
            f"{tps['peft_one_adapter_at_a_time']:.1f} tok/s "
            f"(one adapter at a time) | | ours / PEFT = **{s['ours_over_peft']:.2f}** | >= 3 |"
        )
    m = results.get("memory")
    if m:
        peak = {k: v["peak_rss_mib"] for k, v in m.items()}
        lines.append(
            "| peak RSS while running (forward + generate + train step; loading excluded) | "
            f"{peak['softprompt']:.0f} MiB | "
            f"{peak['peft_prompt_tuning']:.0f} MiB | bare (forward + generate): {peak['bare']:.0f} MiB | | |"
        )
    a = results.get("adapter_bytes")
    if a:
        lines.append(
            f"| adapter files (N={results['meta']['num_virtual_tokens']}) | {a['softprompt']} B | "
            f"{a['peft_prompt_tuning']} B | | | |"
        )
    if g:
        c = g["correctness"]
        lines += [
            "",
            (
                "Generation check against a no-cache step-by-step reference: softprompt "
                f"{'matches' if c['softprompt_equals_reference'] else 'DIFFERS'}, PEFT "
                f"{'matches' if c['peft_equals_reference'] else 'differs'}."
            ),
        ]
    sc = results.get("scaling")
    if sc:
        lines += [
            "",
            f"## Scaling (B={sc['batch']})",
            "",
            "| N | L | train: PEFT / ours | forward: ours / bare | forward: PEFT / bare |",
            "|---|---|---|---|---|",
        ]
        for row in sc["rows"]:
            lines.append(
                f"| {row['n']} | {row['length']} | {row['train_peft_over_ours']:.2f} | "
                f"{row['forward_ours_over_bare']:.3f} | "
                f"{row['forward_peft_over_bare']:.3f} |"
            )
    (out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    plot(results, out_dir / f"{name}.png")


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    bars = []
    if "train" in results:
        bars.append(("train step\nPEFT/ours", results["train"]["peft_over_ours"], 1.25))
    if "forward" in results:
        bars.append(("forward\nbare/ours", 1 / results["forward"]["ours_over_bare"], 1 / 1.05))
    if "generate" in results:
        bars.append(("generate\nours/bare", results["generate"]["ours_over_bare"], 0.95))
    if "serving" in results:
        bars.append(("serving\nours/PEFT", results["serving"]["ours_over_peft"], 3.0))
    ax = axes[0]
    ax.bar([b[0] for b in bars], [b[1] for b in bars], color="tab:blue")
    ax.scatter([b[0] for b in bars], [b[2] for b in bars], color="tab:red", marker="_", s=600, label="target")
    ax.set_ylabel("ratio (higher is better for softprompt)")
    ax.legend()
    ax.set_title("softprompt vs PEFT / bare model")
    ax = axes[1]
    if "scaling" in results:
        for n in sorted({r["n"] for r in results["scaling"]["rows"]}):
            rows = [r for r in results["scaling"]["rows"] if r["n"] == n]
            ax.plot(
                [r["length"] for r in rows],
                [r["train_peft_over_ours"] for r in rows],
                marker="o",
                label=f"train, N={n}",
            )
            ax.plot(
                [r["length"] for r in rows],
                [1 / r["forward_ours_over_bare"] for r in rows],
                marker="x",
                linestyle="--",
                label=f"forward bare/ours, N={n}",
            )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("input length L")
        ax.set_ylabel("ratio")
        ax.set_title("scaling")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", default=None, help="Model id or folder (default: the packaged SmolLM2-135M-Instruct)."
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--num-virtual-tokens", type=int, default=20)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--gen-batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--scaling-batch", type=int, default=4)
    parser.add_argument("--sections", default="train,forward,step,bf16,generate,serving,memory,scaling")
    parser.add_argument("--quick", action="store_true", help="3 repeats, no scaling, no memory.")
    parser.add_argument("--out", default=str(ROOT / "results"))
    parser.add_argument("--name", default=None)
    parser.add_argument(
        "--update",
        action="store_true",
        help="Merge into an existing result file (re-measure --sections only).",
    )
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        return memory_child(args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sections = set(args.sections.split(","))
    if args.quick:
        args.repeats = min(args.repeats, 3)
        sections -= {"scaling", "memory"}
    import peft
    import transformers

    base, tokenizer = load_base(args.model)
    for p in base.parameters():
        p.requires_grad_(False)
    pool = ordinary_ids(tokenizer, base.config.vocab_size)
    n, length, batch = args.num_virtual_tokens, args.length, args.batch
    results: dict[str, Any] = {
        "meta": {
            "model": args.model or "SmolLM2-135M-Instruct",
            "threads": args.threads,
            "repeats": args.repeats,
            "num_virtual_tokens": n,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "machine": f"{platform.machine()} {platform.processor() or ''} ({os.cpu_count()} cpus)".strip(),
            "date": time.strftime("%Y-%m-%d %H:%M"),
        }
    }

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    if "train" in sections:
        log("train step ...")
        secs = bench_train(base, pool, n, length, batch, args.repeats)
        results["train"] = {
            "n": n,
            "length": length,
            "batch": batch,
            "seconds": secs,
            "peft_over_ours": secs["peft_prompt_tuning"] / secs["softprompt"],
        }
        log(json.dumps(results["train"]))
    if "forward" in sections:
        log("forward ...")
        secs = bench_forward(base, pool, n, length, batch, args.repeats)
        results["forward"] = {
            "n": n,
            "length": length,
            "batch": batch,
            "seconds": secs,
            "ours_over_bare": secs["softprompt"] / secs["bare"],
            "peft_over_bare": secs["peft_prompt_tuning"] / secs["bare"],
        }
        log(json.dumps(results["forward"]))
    if "step" in sections:
        log("train step vs bare forward ...")
        secs = bench_step(base, pool, n, length, batch, args.repeats)
        results["step"] = {
            "n": n,
            "length": length,
            "batch": batch,
            "seconds": secs,
            "step_over_bare_forward": secs["softprompt_train_step"] / secs["bare_forward"],
            "loss_only_step_over_bare_forward": secs["softprompt_train_step_loss_only"]
            / secs["bare_forward"],
            "bare_step_over_bare_forward": secs["bare_train_step"] / secs["bare_forward"],
        }
        log(json.dumps(results["step"]))
    if "bf16" in sections:
        log("bfloat16 train step and forward ...")
        b = bench_bf16(base, pool, n, length, batch, args.repeats)
        b.update({"n": n, "length": length, "batch": batch})
        results["bf16"] = b
        log(json.dumps(b))
    if "generate" in sections:
        log("generate ...")
        g = bench_generate(base, pool, n, length, args.gen_batch, args.new_tokens, args.repeats)
        g.update(
            {
                "n": n,
                "length": length,
                "batch": args.gen_batch,
                "new_tokens": args.new_tokens,
                "ours_over_bare": g["tokens_per_s"]["softprompt"] / g["tokens_per_s"]["bare"],
                "peft_over_bare": g["tokens_per_s"]["peft_prompt_tuning"] / g["tokens_per_s"]["bare"],
            }
        )
        results["generate"] = g
        log(json.dumps(g))
    if "serving" in sections:
        log("serving ...")
        s = bench_serving(base, pool, n, length, args.adapters, args.new_tokens, args.repeats)
        s.update(
            {
                "adapters": args.adapters,
                "new_tokens": args.new_tokens,
                "length": length,
                "ours_over_peft": s["tokens_per_s"]["softprompt_mixed_batch"]
                / s["tokens_per_s"]["peft_one_adapter_at_a_time"],
            }
        )
        results["serving"] = s
        log(json.dumps(s))
    results["adapter_bytes"] = adapter_sizes(base, n)
    if "memory" in sections:
        log("memory (one subprocess per system) ...")
        results["memory"] = bench_memory(args)
        log(json.dumps(results["memory"]))
    if "scaling" in sections:
        rows = []
        for n_s in (1, 20, 100):
            for l_s in (32, 128, 512):
                log(f"scaling N={n_s} L={l_s} ...")
                tr = bench_train(
                    base, pool, n_s, l_s, args.scaling_batch, max(3, args.repeats - 2), lora=False
                )
                fw = bench_forward(base, pool, n_s, l_s, args.scaling_batch, max(3, args.repeats - 2))
                rows.append(
                    {
                        "n": n_s,
                        "length": l_s,
                        "train_seconds": tr,
                        "forward_seconds": fw,
                        "train_peft_over_ours": tr["peft_prompt_tuning"] / tr["softprompt"],
                        "forward_ours_over_bare": fw["softprompt"] / fw["bare"],
                        "forward_peft_over_bare": fw["peft_prompt_tuning"] / fw["bare"],
                    }
                )
        results["scaling"] = {"batch": args.scaling_batch, "rows": rows}
    name = args.name or f"bench-{Path(results['meta']['model']).name}"
    previous = Path(args.out) / f"{name}.json"
    if args.update and previous.exists():  # re-measure some sections, keep the others
        merged = json.loads(previous.read_text())
        remeasured = sorted(k for k in results if k != "meta")
        merged.setdefault("meta", {}).setdefault("updates", []).append(
            {"date": results["meta"]["date"], "sections": remeasured, "repeats": results["meta"]["repeats"]}
        )
        merged.update({k: v for k, v in results.items() if k != "meta"})
        results = merged
    write_report(results, Path(args.out), name)
    print((Path(args.out) / f"{name}.md").read_text())


if __name__ == "__main__":
    main()
