"""What a prompt learned: nearest vocabulary tokens, norms, similarity between prompts.

Lester et al. (2021) read learned prompts by their nearest neighbours in the embedding
table (cosine similarity); class-label-initialised prompts often keep their label words
nearby. Norms show how far training moved a token away from the embedding manifold.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from softprompt.core.model import SoftPromptModel


def _token_table(model: SoftPromptModel, tokenizer: Any) -> torch.Tensor:
    """The input embeddings the model sees, `(V, H)` float32, limited to the tokenizer's ids."""
    embed = model.base_model.get_input_embeddings()
    rows = min(embed.weight.shape[0], len(tokenizer)) if tokenizer is not None else embed.weight.shape[0]
    with torch.no_grad():
        ids = torch.arange(rows, device=model.device)
        return torch.cat([embed(chunk) for chunk in ids.split(8192)]).float().cpu()


def nearest_tokens(
    model: SoftPromptModel, tokenizer: Any, adapter: str, top_k: int = 5
) -> list[dict[str, Any]]:
    """For each virtual token: its norm and the `top_k` vocabulary tokens closest by cosine.

    Returns:
        One dict per position: `position`, `norm`, `nearest` (list of token, id, cosine).
    """
    prompt = model.get_prompt(adapter).detach().float().cpu()  # (N, H)
    table = _token_table(model, tokenizer)
    sims = F.normalize(prompt, dim=1) @ F.normalize(table, dim=1).t()  # (N, V)
    values, ids = sims.topk(min(top_k, table.shape[0]), dim=1)
    out = []
    for pos in range(prompt.shape[0]):
        nearest = []
        for v, i in zip(values[pos].tolist(), ids[pos].tolist()):
            token = tokenizer.convert_ids_to_tokens(i) if tokenizer is not None else str(i)
            text = tokenizer.decode([i]) if tokenizer is not None else str(i)
            nearest.append({"id": i, "token": text, "piece": token, "cosine": round(v, 4)})
        out.append({"position": pos, "norm": round(float(prompt[pos].norm()), 4), "nearest": nearest})
    return out


def compare_adapters(model: SoftPromptModel, a: str, b: str) -> dict[str, Any]:
    """How similar two prompts are.

    Returns:
        `position_cosine` (cosine of each aligned position, over the shorter length),
        `mean_position_cosine`, `prompt_cosine` (of the mean vectors) and
        `mean_best_match_cosine` (each token of `a` matched to its closest token of `b`,
        which ignores order and length differences).
    """
    pa, pb = (model.get_prompt(n).detach().float().cpu() for n in (a, b))
    n = min(pa.shape[0], pb.shape[0])
    aligned = F.cosine_similarity(pa[:n], pb[:n], dim=1)
    best = (F.normalize(pa, dim=1) @ F.normalize(pb, dim=1).t()).amax(dim=1)
    return {
        "lengths": [pa.shape[0], pb.shape[0]],
        "position_cosine": [round(x, 4) for x in aligned.tolist()],
        "mean_position_cosine": float(aligned.mean()),
        "prompt_cosine": float(F.cosine_similarity(pa.mean(0), pb.mean(0), dim=0)),
        "mean_best_match_cosine": float(best.mean()),
        "l2_distance": float((pa[:n] - pb[:n]).norm()),
    }
