"""Turning (prompt, answer) text into training tensors, in one of two prompt formats.

``chat``: the model's own chat template (user turn + generation prompt), answer, end-of-turn token.
``question-answer``: the paper's ``Question: {q}\\nAnswer:{a}`` form, answer, EOS.
The prompt and the answer are tokenised separately and concatenated, so the prompt/answer
boundary is exact and prompt tokens can be masked out of the loss.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch

PromptFormat = Literal["chat", "question-answer"]
IGNORE_INDEX = -100


def format_prompt(tokenizer: Any, prompt: str, fmt: PromptFormat) -> str:
    """The text a model sees before its answer."""
    if fmt == "question-answer":
        return f"Question: {prompt}\nAnswer:"
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "prompt_format is 'chat' but this tokenizer has no chat template; use "
            "--set data.prompt_format=question-answer"
        )
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_prompt_answer(
    tokenizer: Any, prompt: str, answer: str, fmt: PromptFormat, max_length: int
) -> tuple[list[int], int]:
    """Token ids of prompt + answer + EOS (truncated), and how many of them belong to the prompt."""
    prompt_ids = _ids(tokenizer, format_prompt(tokenizer, prompt, fmt))
    answer_ids = _ids(tokenizer, answer) + [tokenizer.eos_token_id]
    ids = (prompt_ids + answer_ids)[:max_length]
    return ids, min(len(prompt_ids), len(ids))


def encode_sft(
    tokenizer: Any, prompt: str, answer: str, fmt: PromptFormat, max_length: int, mask_prompt: bool
) -> dict[str, list[int]]:
    ids, n_prompt = encode_prompt_answer(tokenizer, prompt, answer, fmt, max_length)
    labels = list(ids)
    if mask_prompt:
        labels[:n_prompt] = [IGNORE_INDEX] * n_prompt
    return {"input_ids": ids, "labels": labels}


def collate_sft(examples: Sequence[dict[str, list[int]]], pad_id: int, mask_padding: bool) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example. Padding is attended to by nobody; it is trained on
    (as the paper's original attack did) only when ``mask_padding`` is False."""
    length = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX if mask_padding else pad_id, dtype=torch.long)
    attention = torch.zeros((len(examples), length), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[row, :n] = torch.tensor(e["input_ids"])
        labels[row, :n] = torch.tensor(e["labels"])
        attention[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


def encode_pair(
    tokenizer: Any, prompt: str, harmful: str, harmless: str, fmt: PromptFormat, max_length: int
) -> dict[str, list[int]]:
    """Both sides of a RepNoise pair: same prompt, different answers, tokenised separately."""
    harmful_ids, _ = encode_prompt_answer(tokenizer, prompt, harmful, fmt, max_length)
    harmless_ids, _ = encode_prompt_answer(tokenizer, prompt, harmless, fmt, max_length)
    return {"harmful": harmful_ids, "harmless": harmless_ids}


def collate_pairs(examples: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad both sides to one common length T with ``pad_id`` (EOS), as the paper does.

    Padding to the longest sequence in the batch instead of a fixed 128 changes no loss value:
    positions where both sides are padding have equal ids and are outside the RepNoise mask,
    and right padding never changes what earlier (causal) positions see.
    """
    length = max(max(len(e["harmful"]), len(e["harmless"])) for e in examples)
    batch: dict[str, torch.Tensor] = {}
    for side in ("harmful", "harmless"):
        ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
        attention = torch.zeros((len(examples), length), dtype=torch.long)
        for row, e in enumerate(examples):
            n = len(e[side])
            ids[row, :n] = torch.tensor(e[side])
            attention[row, :n] = 1
        batch[f"{side}_input_ids"] = ids
        batch[f"{side}_attention_mask"] = attention
    return batch
