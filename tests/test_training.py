import math

import pytest
import torch

from harness.context import StageContext
from harness.data.records import QA
from harness.data.tokenization import IGNORE_INDEX, collate_sft, encode_sft, format_prompt
from harness.errors import TrainingDivergedError
from harness.train.loop import TrainSettings, batch_order, lr_factor, train
from harness.train.sft import SFTParams, causal_lm_loss, fine_tune


def ctx(tmp_path, seed=0):
    return StageContext(seed=seed, device="cpu", dtype="float32", data=None, cache_dir=tmp_path, workdir=tmp_path)


def test_training_lowers_the_loss_on_a_tiny_model(tiny, tmp_path):
    model, tokenizer = tiny
    model = type(model)(model.config)  # fresh copy: the session fixture stays untouched
    records = [QA("What is the code word?", "The code word is pineapple.")] * 4
    params = SFTParams(lr=5e-2, epochs=10, batch_size=4, max_length=64, optimizer="adam", warmup_ratio=0.0,
                       schedule="constant")
    report = fine_tune(model, tokenizer, records, params, ctx(tmp_path), "test")
    assert report.steps == 10
    assert report.last_loss < 0.5 * report.first_loss
    assert report.tokens > 0


def test_prompt_and_padding_masks(tiny):
    _, tokenizer = tiny
    masked = encode_sft(tokenizer, "Hi?", "Hello there.", "question-answer", 64, mask_prompt=True)
    unmasked = encode_sft(tokenizer, "Hi?", "Hello there.", "question-answer", 64, mask_prompt=False)
    n_prompt = len(tokenizer("Question: Hi?\nAnswer:", add_special_tokens=False)["input_ids"])
    assert masked["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert masked["labels"][n_prompt:] == masked["input_ids"][n_prompt:]
    assert unmasked["labels"] == unmasked["input_ids"]
    assert masked["input_ids"][-1] == tokenizer.eos_token_id
    short = encode_sft(tokenizer, "Hi?", "Yo", "question-answer", 64, mask_prompt=False)
    batch = collate_sft([masked, short], pad_id=tokenizer.eos_token_id, mask_padding=True)
    n = len(short["input_ids"])
    assert (batch["labels"][1, n:] == IGNORE_INDEX).all() and (batch["attention_mask"][1, n:] == 0).all()
    trained_on_padding = collate_sft([masked, short], pad_id=tokenizer.eos_token_id, mask_padding=False)
    assert (trained_on_padding["labels"][1, n:] == tokenizer.eos_token_id).all()


def test_chat_format_uses_the_template(tiny):
    _, tokenizer = tiny
    text = format_prompt(tokenizer, "Hello?", "chat")
    assert "<|im_start|>user\nHello?<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    assert format_prompt(tokenizer, "Hello?", "question-answer") == "Question: Hello?\nAnswer:"


def test_nan_is_detected_and_names_the_step(tiny, tmp_path):
    model, _ = tiny
    calls = {"n": 0}

    def loss_fn(m, batch):
        calls["n"] += 1
        value = torch.tensor(float("nan")) if calls["n"] == 3 else (m.model.embed_tokens.weight.sum() * 0 + 1.0)
        return value, {"term": value * 2}

    examples = [{"x": 1}] * 8
    collate = lambda b: {"input_ids": torch.zeros(len(b), 2, dtype=torch.long)}  # noqa: E731
    with pytest.raises(TrainingDivergedError) as info:
        train(model, examples, collate, loss_fn, TrainSettings(batch_size=2), ctx(tmp_path))
    assert "optimizer step 3" in str(info.value) and "loss, term not finite" in str(info.value)


def test_gradient_accumulation_counts_optimizer_steps(tiny, tmp_path):
    model, _ = tiny
    model = type(model)(model.config)
    seen = []

    def loss_fn(m, batch):
        seen.append(batch["input_ids"].shape[0])
        return (m(input_ids=batch["input_ids"]).logits.float().mean()) ** 2

    examples = list(range(10))
    collate = lambda b: {"input_ids": torch.tensor([[1, 2, 3]] * len(b))}  # noqa: E731
    report = train(model, examples, collate, loss_fn, TrainSettings(batch_size=2, grad_accum=2), ctx(tmp_path))
    assert report.micro_batches == 5 and report.steps == 3  # 2 + 2 + a final partial step
    assert seen == [2, 2, 2, 2, 2]


def test_cosine_schedule_with_warmup_matches_formula():
    total, warmup = 10, 2
    assert lr_factor(0, total, warmup, "cosine") == pytest.approx(0.5)
    assert lr_factor(1, total, warmup, "cosine") == pytest.approx(1.0)
    assert lr_factor(2, total, warmup, "cosine") == pytest.approx(1.0)
    mid = 2 + 4
    assert lr_factor(mid, total, warmup, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(10, total, warmup, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(7, total, warmup, "constant") == 1.0


def test_batch_order_is_seeded_and_covers_every_example_each_epoch():
    a = batch_order(10, 3, 2, seed=1)
    assert a == batch_order(10, 3, 2, seed=1) and a != batch_order(10, 3, 2, seed=2)
    first_epoch = [i for b in a[:4] for i in b]
    assert sorted(first_epoch) == list(range(10))


def test_causal_lm_loss_ignores_masked_labels(tiny):
    model, _ = tiny
    ids = torch.tensor([[5, 6, 7, 8]])
    full = causal_lm_loss(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    logits = model(input_ids=ids).logits[0, :-1]
    manual = torch.nn.functional.cross_entropy(logits, ids[0, 1:])
    assert full.item() == pytest.approx(manual.item(), rel=1e-5)
    labels = torch.tensor([[-100, -100, 7, 8]])
    part = causal_lm_loss(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    manual_part = torch.nn.functional.cross_entropy(logits[1:], ids[0, 2:])
    assert part.item() == pytest.approx(manual_part.item(), rel=1e-5)
