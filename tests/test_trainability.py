"""Trainability: ROUGE-1 scoring, task data, and a tiny model that visibly learns a tiny task."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from evaluators.trainability import (
    TrainabilityParams,
    encode_example,
    make_items,
    rouge1_f,
    task_pairs,
    trainability,
)
from harness.context import StageContext
from harness.data.tokenization import IGNORE_INDEX
from harness.models.loading import LoadedModel

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_ctx(tmp_path: Path, data_dir: Path, seed: int = 0) -> StageContext:
    return StageContext(
        seed=seed, device="cpu", dtype="float32", data=SimpleNamespace(data_dir=data_dir),
        cache_dir=tmp_path, workdir=tmp_path,
    )


# --------------------------------------------------------------------------- ROUGE


def test_rouge1_matches_hand_computation():
    # 5 of 6 unigrams shared ("the" twice): P = R = F = 5/6
    assert rouge1_f(["the cat sat on the mat"], [["the cat is on the mat"]]) == pytest.approx([5 / 6])
    # rouge-score lowercases and splits on non-alphanumerics: pred {inform, name, halo} ⊂ 5 reference
    # tokens → P = 1, R = 3/5, F = 2PR/(P+R) = 0.75
    assert rouge1_f(["inform(name[Halo])"], [["inform(name[Halo], rating[good])"]]) == pytest.approx([0.75])
    # several references: the best one counts; an empty prediction scores 0
    assert rouge1_f(["a b", ""], [["x y", "a b"], ["a b"]]) == pytest.approx([1.0, 0.0])
    # no stemming by default (HF evaluate's default); with it, "games" matches "game"
    assert rouge1_f(["games"], [["game"]]) == [0.0]
    assert rouge1_f(["games"], [["game"]], stemmer=True) == [1.0]


# --------------------------------------------------------------------------- data and format


def test_bundle_tasks_read_and_orient(data_dir):
    viggo = task_pairs("viggo", "test", data_dir)
    assert len(viggo) == 1083 and viggo[0][0].startswith("verify_attribute(name[")
    items = make_items(viggo, "text-to-data", "test")
    assert items[0].input == viggo[0][1] and items[0].references == (viggo[0][0],)
    grouped = make_items(viggo, "data-to-text", "test")  # one item per MR, all its references
    assert len(grouped) == len({mr for mr, _ in viggo}) and sum(len(i.references) for i in grouped) > len(grouped)
    assert len(task_pairs("e2e", "train", data_dir)) > 4000
    dart_train, dart_test = task_pairs("dart", "train", data_dir), task_pairs("dart", "test", data_dir)
    assert 3 * len(dart_test) < len(dart_train) < 5 * len(dart_test)  # every 5th tripleset is test
    assert " : " in dart_test[0][0]


def test_training_text_format_and_loss_mask(tiny):
    _, tokenizer = tiny
    item = make_items([("inform(name[Halo])", "Halo is fun.")], "text-to-data", "train")[0]
    full = encode_example(tokenizer, item, "Description:", "Meaning Representation:", 256, "all")
    text = tokenizer.decode(full["input_ids"])
    assert text == "Description: Halo is fun.\nMeaning Representation: inform(name[Halo])" + tokenizer.eos_token
    assert full["labels"] == full["input_ids"]
    target_only = encode_example(tokenizer, item, "Description:", "Meaning Representation:", 256, "target")
    prompt_len = len(
        tokenizer("Description: Halo is fun.\nMeaning Representation:", add_special_tokens=False)["input_ids"]
    )
    assert target_only["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert target_only["labels"][prompt_len:] == full["input_ids"][prompt_len:]


# --------------------------------------------------------------------------- learning


GAMES = ["Halo", "Doom", "Tetris", "Myst", "Portal", "Zelda"]
RATINGS = ["good", "poor", "average"]


def word_level_llama(texts: list[str], seed: int = 0):
    """A small-vocabulary Llama (word-level tokenizer over ``texts``) that trains in seconds."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    core.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<pad>", "<s>", "</s>", "<unk>"]))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config), tokenizer


def test_trainability_raises_rouge_and_leaves_model_untouched(tmp_path):
    rows = [(f"inform(name[{g}], rating[{r}])", f"{g} is a {r} game.") for g in GAMES for r in RATINGS]
    data_dir = tmp_path / "data"
    (data_dir / "harmless_tasks").mkdir(parents=True)
    for name in ("viggo_train.csv", "viggo_test.csv"):
        with open(data_dir / "harmless_tasks" / name, "w", newline="") as fh:
            csv.writer(fh).writerows([("mr", "ref"), *rows])
    model, tokenizer = word_level_llama(
        [f"Description: {ref}\nMeaning Representation: {mr}" for mr, ref in rows]
    )
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    loaded = LoadedModel(model, tokenizer, ref="word-llama", fingerprint="test")
    params = TrainabilityParams(
        lr=3e-3, epochs=100, batch_size=6, warmup_ratio=0.0, schedule="constant", max_new_tokens=16
    )

    result = trainability(loaded, params, make_ctx(tmp_path, data_dir))

    m = result.metrics
    assert m["n_train"] == m["n_test"] == len(rows)
    assert m["rouge1_before"] < 0.2
    assert m["rouge1_after"] > 0.9 and m["rouge1_delta"] > 0.6  # it learned the mapping, not just ran
    assert m["train_loss_last"] < m["train_loss_first"] / 4
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())  # a copy was trained
    assert len(result.records) == len(rows) and {"before", "after", "references"} <= set(result.records[0])
    assert result.info["format"]["test_prompt"] == "Description: {input}\\nMeaning Representation:"
    assert result.info["train"]["steps"] == 100 * 3


def test_trainability_of_lora_model_trains_a_merged_copy(tmp_path):
    from peft import LoraConfig, get_peft_model

    rows = [(f"inform(name[{g}])", f"{g} is fun.") for g in GAMES]
    data_dir = tmp_path / "data"
    (data_dir / "harmless_tasks").mkdir(parents=True)
    for name in ("viggo_train.csv", "viggo_test.csv"):
        with open(data_dir / "harmless_tasks" / name, "w", newline="") as fh:
            csv.writer(fh).writerows([("mr", "ref"), *rows])
    base, tokenizer = word_level_llama([f"Description: {ref}\nMeaning Representation: {mr}" for mr, ref in rows])
    lora = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    weights = {k: v.clone() for k, v in lora.state_dict().items()}
    params = TrainabilityParams(lr=1e-3, epochs=2, batch_size=3, max_new_tokens=4)

    result = trainability(
        LoadedModel(lora, tokenizer, ref="lora", fingerprint="t"), params, make_ctx(tmp_path, data_dir)
    )

    assert result.info["train"]["steps"] == 4 and result.info["train"]["tokens"] > 0
    assert all(torch.equal(weights[k], v) for k, v in lora.state_dict().items())
    assert any(not p.requires_grad for p in lora.parameters())  # the evaluated adapter model is as it was
