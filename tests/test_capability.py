"""Capability (lm-eval on the offline task configs) and perplexity evaluators."""

from __future__ import annotations

import csv
import math
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from evaluators.capability import (
    DEFAULT_TASKS,
    CapabilityParams,
    capability,
    local_task_names,
    render_local_tasks,
)
from evaluators.lm_eval_tasks.utils import interleave_subjects
from evaluators.perplexity import PerplexityParams, encode_texts, perplexity
from harness.context import StageContext
from harness.errors import ConfigError, DataError
from harness.models.loading import LoadedModel

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_ctx(tmp_path: Path, data_dir: Path) -> StageContext:
    return StageContext(
        seed=0, device="cpu", dtype="float32", data=SimpleNamespace(data_dir=data_dir),
        cache_dir=tmp_path, workdir=tmp_path,
    )


@pytest.fixture
def loaded(tiny) -> LoadedModel:
    model, tokenizer = tiny
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, ref="tiny-llama", fingerprint="test")


# --------------------------------------------------------------------------- task configs


def test_local_tasks_render_with_absolute_paths_and_resolve(tmp_path, data_dir):
    from lm_eval.tasks import TaskManager

    assert set(DEFAULT_TASKS) == set(local_task_names())
    fingerprints = render_local_tasks(DEFAULT_TASKS, data_dir, tmp_path / "tasks")
    for name in DEFAULT_TASKS:
        text = (tmp_path / "tasks" / f"{name}.yaml").read_text()
        assert "${HARNESS_DATA_DIR}" not in text and str(data_dir.resolve()) + "/capability_eval/" in text
        assert len(fingerprints[name]["fingerprint"]) == 16 and fingerprints[name]["data_files"]
    manager = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    assert sorted(manager.all_tasks) == sorted(DEFAULT_TASKS)  # the built-in index was not read


def test_missing_data_file_is_a_clear_error(tmp_path):
    (tmp_path / "capability_eval").mkdir()
    with pytest.raises(DataError, match="arc_easy_test.jsonl"):
        render_local_tasks(["arc_easy_local"], tmp_path, tmp_path / "tasks")


def test_mistyped_local_task_fails_fast(tmp_path, data_dir, loaded):
    with pytest.raises(ConfigError, match="arc_easy_local"):
        capability(loaded, CapabilityParams(tasks=["arc_esay_local"]), make_ctx(tmp_path, data_dir))
    with pytest.raises(ConfigError, match="mmlu_local"):
        params = CapabilityParams(tasks=["arc_easy_local"], task_limits={"mmlu_local": 3})
        capability(loaded, params, make_ctx(tmp_path, data_dir))


def test_evaluators_declare_the_bundle_files_they_read(data_dir):
    """The pipeline can fingerprint these files into each evaluate stage's cache key."""
    from evaluators.perplexity import PerplexityParams
    from evaluators.trainability import TrainabilityParams
    from harness.registry import evaluators

    cases = {"capability": CapabilityParams(), "perplexity": PerplexityParams(), "trainability": TrainabilityParams()}
    for name, params in cases.items():
        files = evaluators._plugins[name].info["data_files"](params)
        assert files and all((data_dir / f).is_file() for f in files), name
    assert len(capability_data_files_for(["mmlu_local"])) == 2


def capability_data_files_for(tasks):
    from evaluators.capability import capability_data_files

    return capability_data_files(CapabilityParams(tasks=tasks))


def test_mmlu_interleaves_subjects_and_takes_same_subject_fewshot(tmp_path, data_dir):
    import datasets
    from lm_eval.tasks import TaskManager

    toy = datasets.Dataset.from_dict({"subject": ["b", "a", "b", "a", "c"], "question": list("12345")})
    assert interleave_subjects(toy)["question"] == ["2", "1", "5", "4", "3"]

    render_local_tasks(["mmlu_local"], data_dir, tmp_path / "tasks")
    task = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False).load(["mmlu_local"])["tasks"][
        "mmlu_local"
    ]
    docs = task.eval_docs
    first = [docs[i]["subject"] for i in range(57)]
    assert len(set(first)) == 57  # the first 57 documents span every subject
    doc = docs[1]  # anatomy
    prompt = task.fewshot_context(doc, 2)
    dev = [d for d in task.fewshot_docs() if d["subject"] == doc["subject"]][:2]
    assert prompt.startswith("The following are multiple choice questions (with answers) about anatomy.\n\n")
    assert prompt.index(dev[0]["question"].strip()) < prompt.index(dev[1]["question"].strip())
    assert prompt.endswith(f"{doc['question'].strip()}\nA. {doc['choices'][0]}\nB. {doc['choices'][1]}\n"
                           f"C. {doc['choices'][2]}\nD. {doc['choices'][3]}\nAnswer:")


# --------------------------------------------------------------------------- end to end through lm-eval


def test_capability_scores_tiny_model_offline_without_network(tmp_path, data_dir, loaded, monkeypatch):
    attempts = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError(f"network access attempted: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model = loaded.model
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()

    params = CapabilityParams(limit=2, task_limits={"truthfulqa_mc1_local": 1}, bootstrap_iters=0, batch_size=4)
    result = capability(loaded, params, make_ctx(tmp_path, data_dir))

    assert attempts == []
    assert model.training and all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    for task in DEFAULT_TASKS:
        metrics = result.metrics[task]
        assert metrics["n"] == (1 if task == "truthfulqa_mc1_local" else 2) and 0.0 <= metrics["acc"] <= 1.0
        assert result.info["tasks"][task]["source"] == "local"
        assert result.info["tasks"][task]["fingerprint"]
    assert set(result.metrics["arc_easy_local"]) >= {"acc", "acc_norm", "acc_stderr"}
    assert result.info["lm_eval_version"] == "0.4.13"
    assert len(result.records) == 2 * len(DEFAULT_TASKS) - 1
    for record in result.records:  # accuracy is the argmax of the per-choice log-likelihoods
        assert record["acc"] == float(record["pred"] == int(record["target"]))

    # lm-eval's log-likelihood of an ARC choice equals the one computed by hand with the same model
    import json

    arc = json.loads((data_dir / "capability_eval/arc_easy_test.jsonl").read_text().splitlines()[0])
    record = next(r for r in result.records if r["task"] == "arc_easy_local" and r["doc_id"] == 0)
    context = f"Question: {arc['prompt']}\nAnswer:"
    tokenizer = loaded.tokenizer
    for choice_index in (0, 3):
        whole = tokenizer(context + " " + arc["choices"][choice_index], add_special_tokens=False)["input_ids"]
        n_context = len(tokenizer(context, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), dim=-1)
        expected = sum(float(logprobs[t - 1, whole[t]]) for t in range(n_context, len(whole)))
        assert record["loglikelihoods"][choice_index] == pytest.approx(expected, abs=2e-3)


# --------------------------------------------------------------------------- perplexity


def write_texts(data_dir: Path, texts: list[str]) -> None:
    (data_dir / "harmless_tasks").mkdir(parents=True, exist_ok=True)
    with open(data_dir / "harmless_tasks" / "viggo_test.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["mr", "ref"])
        writer.writerows([("inform()", t) for t in texts])


TEXTS = [
    "Halo is a shooter released in 2001.",
    "Tetris is a puzzle game.",
    "Myst, an adventure game from 1993, is available on Mac and PC, but not on Linux or Steam.",
    "Portal",
]


def test_perplexity_matches_hand_computation(tmp_path, loaded):
    write_texts(tmp_path / "data", TEXTS)
    params = PerplexityParams(source="viggo", num_texts=None, batch_size=3, max_length=12)
    result = perplexity(loaded, params, make_ctx(tmp_path, tmp_path / "data"))

    model, tokenizer = loaded.model, loaded.tokenizer
    total_nll, total_tokens, truncated = 0.0, 0, 0
    for text in TEXTS:  # one unpadded sequence at a time, token by token
        ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
        truncated += len(ids) > 12
        ids = ids[:12]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
        for t in range(1, len(ids)):
            total_nll -= float(logprobs[t - 1, ids[t]])
            total_tokens += 1
    assert result.metrics["tokens"] == total_tokens
    assert result.metrics["n_texts"] == len(TEXTS) and result.metrics["truncated"] == truncated == 2
    assert result.metrics["mean_nll"] == pytest.approx(total_nll / total_tokens, rel=1e-5)
    assert result.metrics["perplexity"] == pytest.approx(math.exp(total_nll / total_tokens), rel=1e-5)
    assert sum(r["tokens"] for r in result.records) == total_tokens


class UniformLM(torch.nn.Module):
    """Equal logits for every token: perplexity is exactly the vocabulary size."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab) + self.anchor)


def test_perplexity_of_uniform_model_is_vocab_size(tmp_path, tiny):
    _, tokenizer = tiny
    write_texts(tmp_path / "data", TEXTS)
    loaded = LoadedModel(UniformLM(len(tokenizer)), tokenizer, ref="uniform", fingerprint="u")
    result = perplexity(loaded, PerplexityParams(source="viggo", batch_size=2), make_ctx(tmp_path, tmp_path / "data"))
    assert result.metrics["perplexity"] == pytest.approx(len(tokenizer), rel=1e-6)
    without_prefix = perplexity(
        loaded, PerplexityParams(source="viggo", prefix="none"), make_ctx(tmp_path, tmp_path / "data")
    )
    assert without_prefix.metrics["tokens"] == result.metrics["tokens"] - len(TEXTS)  # first tokens unscored
    assert encode_texts(tokenizer, ["Tetris"], "bos")[0][0] == tokenizer.bos_token_id
    endoftext_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert encode_texts(tokenizer, ["Tetris"], "<|endoftext|>")[0][0] == endoftext_id
    with pytest.raises(ConfigError, match="not a token"):
        encode_texts(tokenizer, ["Tetris"], "<|no such token|>")


@pytest.mark.parametrize("source", ["dart", "viggo", "e2e", "hh-rlhf-chosen"])
def test_perplexity_sources_read_from_bundle(source, data_dir):
    from evaluators.perplexity import read_texts

    texts = read_texts(source, data_dir)
    assert len(texts) > 500 and len(set(texts)) == len(texts) and all(t.strip() == t and t for t in texts)
