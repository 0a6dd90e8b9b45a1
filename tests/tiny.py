"""Factories for tiny transformers models (2 layers, hidden 32) and a word-level tokenizer."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
import transformers as T

VOCAB = 96
PAD, UNK, BOS, EOS = 0, 1, 2, 3
WORDS = [
    "good", "bad", "great", "awful", "movie", "film", "plot", "acting", "the", "a", "was", "is",
    "positive", "negative", "review", "sentiment", "classify", "this", "it", "very", "not", "fun",
    "boring", "and", "story", "music", "love", "hate", "best", "worst", "ever", "so",
]  # fmt: skip


def make_tokenizer(padding_side: str = "left") -> T.PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over WORDS plus 4 special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": PAD, "[UNK]": UNK, "[BOS]": BOS, "[EOS]": EOS}
    for w in WORDS:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return T.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        padding_side=padding_side,
    )


def _common(**kw):
    return dict(vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, **kw)


def config_for(arch: str, **extra) -> T.PretrainedConfig:
    if arch == "gpt2":
        cfg = T.GPT2Config(
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=128,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **_common(),
        )
    elif arch == "llama":
        cfg = T.LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            **_common(),
        )
    elif arch == "qwen2":
        cfg = T.Qwen2Config(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            **_common(),
        )
    elif arch == "opt":
        cfg = T.OPTConfig(
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=32,
            max_position_embeddings=128,
            dropout=0.0,
            attention_dropout=0.0,
            **_common(),
        )
    elif arch == "gpt_neox":
        cfg = T.GPTNeoXConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
            **_common(),
        )
    elif arch == "t5":
        cfg = T.T5Config(
            d_model=32,
            d_ff=64,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            d_kv=8,
            dropout_rate=0.0,
            decoder_start_token_id=PAD,
            **_common(),
        )
    elif arch == "bart":
        cfg = T.BartConfig(
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_position_embeddings=128,
            dropout=0.0,
            attention_dropout=0.0,
            decoder_start_token_id=EOS,
            forced_eos_token_id=None,
            **_common(),
        )
    elif arch == "bert":
        cfg = T.BertConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=128,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            **_common(),
        )
    elif arch == "roberta":
        cfg = T.RobertaConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=130,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            vocab_size=VOCAB,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
        )
    else:
        raise KeyError(arch)
    for k, v in extra.items():
        setattr(cfg, k, v)
    return cfg


_CLASSES = {
    "CAUSAL_LM": {
        "gpt2": "GPT2LMHeadModel",
        "llama": "LlamaForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
        "opt": "OPTForCausalLM",
        "gpt_neox": "GPTNeoXForCausalLM",
    },
    "SEQ_2_SEQ_LM": {
        "t5": "T5ForConditionalGeneration",
        "bart": "BartForConditionalGeneration",
    },
    "SEQ_CLS": {
        "gpt2": "GPT2ForSequenceClassification",
        "llama": "LlamaForSequenceClassification",
        "qwen2": "Qwen2ForSequenceClassification",
        "bert": "BertForSequenceClassification",
        "roberta": "RobertaForSequenceClassification",
    },
    "TOKEN_CLS": {
        "gpt2": "GPT2ForTokenClassification",
        "llama": "LlamaForTokenClassification",
        "bert": "BertForTokenClassification",
        "roberta": "RobertaForTokenClassification",
    },
    "QUESTION_ANS": {
        "gpt2": "GPT2ForQuestionAnswering",
        "llama": "LlamaForQuestionAnswering",
        "bert": "BertForQuestionAnswering",
        "roberta": "RobertaForQuestionAnswering",
    },
    "FEATURE_EXTRACTION": {
        "gpt2": "GPT2Model",
        "llama": "LlamaModel",
        "bert": "BertModel",
        "roberta": "RobertaModel",
        "t5": "T5EncoderModel",
    },
}

TASK_ARCHS = [(task, arch) for task, archs in _CLASSES.items() for arch in archs]


def build_model(task: str, arch: str, seed: int = 0, **config_extra) -> torch.nn.Module:
    """A freshly initialised tiny model in eval mode, the same weights for the same seed."""
    if task in ("SEQ_CLS", "TOKEN_CLS"):
        config_extra.setdefault("num_labels", 3)
    cfg = config_for(arch, **config_extra)
    torch.manual_seed(seed)
    model = getattr(T, _CLASSES[task][arch])(cfg)
    return model.eval()


def user_ids(arch: str) -> tuple[int, int]:
    """Range of ordinary token ids for random inputs (above the special ids)."""
    return 4, VOCAB


def save_model(folder: str | Path, seed: int = 0, **config_extra) -> Path:
    """A tiny llama causal LM (`build_model`) and the tokenizer, saved to `folder`: a model
    folder the command line and `load_model` read."""
    folder = Path(folder)
    build_model("CAUSAL_LM", "llama", seed=seed, **config_extra).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------- tiny sentiment data
POS = ["good", "great", "best", "love", "fun"]
NEG = ["bad", "awful", "worst", "hate", "boring"]
FILLER = ["the", "movie", "film", "plot", "acting", "was", "is", "very", "so", "story"]


def review_rows(n: int, seed: int) -> list[dict]:
    """`n` labelled reviews, alternately negative and positive: 3 filler words and a sentiment word."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "positive" if i % 2 else "negative"
        words = rng.sample(FILLER, 3) + [rng.choice(POS if label == "positive" else NEG)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def review_workspace(root: Path, splits: dict[str, tuple[int, int]]) -> Path:
    """`root/model` (the tiny llama of `save_model`, initializer_range 0.5, so a prompt learns
    fast) and per split `root/<name>.jsonl`: `review_rows(n, seed)` for `splits[name] = (n, seed)`."""
    save_model(root / "model", initializer_range=0.5)
    for name, (n, seed) in splits.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in review_rows(n, seed)))
    return root


_DATA_OPTIONS = {"train": "--data", "dev": "--dev-data", "test": "--test-data"}


def workspace_args(ws: Path, splits: tuple[str, ...] = ("train", "dev", "test")) -> list[str]:
    """`train`'s `--model` and data options (`--data`, `--dev-data`, `--test-data` for the
    splits named) for the files of a `review_workspace`."""
    args = ["--model", str(ws / "model")]
    for name in splits:
        args += [_DATA_OPTIONS[name], str(ws / f"{name}.jsonl")]
    return args
