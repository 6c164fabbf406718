"""Reading a scorer at its answer position: next-token logits and the tokens that spell a verdict."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch

from harness.api import HarnessError


@torch.no_grad()
def next_token_logits(model: torch.nn.Module, tokenizer: Any, sequences: Sequence[Sequence[int]],
                      batch_size: int) -> torch.Tensor:
    """Float32 CPU logits of the token after each sequence of ids. Batches of similar length, left
    padding with explicit position ids, so a batched sequence scores as it would alone."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    device = next(model.parameters()).device
    rows: list[torch.Tensor] = [torch.empty(0)] * len(sequences)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        length = max(len(sequences[i]) for i in chunk)
        ids = torch.full((len(chunk), length), pad_id, dtype=torch.long)
        attention = torch.zeros((len(chunk), length), dtype=torch.long)
        for row, i in enumerate(chunk):
            ids[row, length - len(sequences[i]) :] = torch.tensor(list(sequences[i]), dtype=torch.long)
            attention[row, length - len(sequences[i]) :] = 1
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids.to(device), attention_mask=attention.to(device),
                       position_ids=positions.to(device), **keep).logits[:, -1].float().cpu()
        for row, i in enumerate(chunk):
            rows[i] = logits[row]
    return torch.stack(rows)


def word_token_ids(tokenizer: Any, word: str, variants: Sequence[str]) -> list[int]:
    """Distinct first tokens of ``variants`` that decode to ``word`` (case-insensitive, spaces ignored):
    the ways a model can start that answer. Only when no variant is a single token are first tokens
    that spell a prefix of the word used instead (e.g. "uns" of "unsafe")."""
    whole: set[int] = set()
    prefix: set[int] = set()
    for variant in variants:
        encoded = tokenizer(variant, add_special_tokens=False)["input_ids"]
        text = tokenizer.decode([encoded[0]]).strip().lower() if encoded else ""
        if text == word.lower():
            whole.add(encoded[0])
        elif text and word.lower().startswith(text):
            prefix.add(encoded[0])
    ids = whole or prefix
    if not ids:
        raise HarnessError(f"This scorer's tokenizer cannot start the answer {word!r} with any token, so its "
                           "probability cannot be read; is this the published model's tokenizer?")
    return sorted(ids)


def verdict_ids(tokenizer: Any, positive: str, negative: str) -> tuple[list[int], list[int]]:
    """Token ids that start the positive and the negative answer (in lower, Title and space-led forms)."""
    def forms(word: str) -> list[str]:
        return [word, word.capitalize(), " " + word, " " + word.capitalize()]

    pos = word_token_ids(tokenizer, positive, forms(positive))
    neg = word_token_ids(tokenizer, negative, forms(negative))
    if set(pos) & set(neg):
        raise HarnessError(f"The tokenizer starts {positive!r} and {negative!r} with the same token; their "
                           "probabilities cannot be told apart.")
    return pos, neg


def two_way(logits: torch.Tensor, positive: list[int], negative: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(P(positive) / (P(positive) + P(negative)), the probability mass on both) per row."""
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    pos = torch.logsumexp(log_probs[:, positive], dim=-1)
    neg = torch.logsumexp(log_probs[:, negative], dim=-1)
    return torch.sigmoid(pos - neg), torch.exp(torch.logaddexp(pos, neg))


def mean_or_none(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
