"""One model's activations for the probe, read with :func:`harness.models.activations.capture_activations`.

Hidden states follow that module's numbering: index 0 is the embeddings (input of layer 0), index j the
output of decoder layer j (1-based here), L + 1 states in all. Only the decoder runs (no [B, T, V] logits);
the LM head is applied to the few rows the logit lens needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from harness.data.tokenization import encode_prompt_answer, format_prompt
from harness.models.activations import capture_activations, decoder_parts

Answers = Sequence[tuple[str, str]]  # (prompt, answer)


@dataclass
class Batch:
    ids: torch.Tensor  # [B, T], right-padded
    attention: torch.Tensor  # [B, T], 1 on real tokens
    answer: torch.Tensor  # [B, T] bool, 1 on answer tokens (prompt tokens and padding 0)


def _pad(rows: list[list[int]], starts: list[int], pad_id: int, device: torch.device) -> Batch:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    answer = torch.zeros((len(rows), length), dtype=torch.bool)
    for i, (row, start) in enumerate(zip(rows, starts)):
        ids[i, :len(row)] = torch.tensor(row)
        attention[i, :len(row)] = 1
        answer[i, start:len(row)] = True
    return Batch(ids.to(device), attention.to(device), answer.to(device))


def _pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def prompt_batches(tokenizer: Any, prompts: Sequence[str], fmt: str, max_length: int, batch_size: int,
                   device: torch.device) -> Iterator[Batch]:
    """Formatted prompts (as the model sees them before answering), truncated and right-padded."""
    for start in range(0, len(prompts), batch_size):
        rows = [list(tokenizer(format_prompt(tokenizer, p, fmt), add_special_tokens=False)["input_ids"])[:max_length]
                for p in prompts[start:start + batch_size]]
        yield _pad(rows, [len(r) for r in rows], _pad_id(tokenizer), device)


def answer_batches(tokenizer: Any, texts: Answers, fmt: str, max_length: int, batch_size: int,
                   device: torch.device) -> Iterator[Batch]:
    """Prompt + answer + EOS (the format the defences and attacks train on), the answer marked."""
    for start in range(0, len(texts), batch_size):
        encoded = [encode_prompt_answer(tokenizer, p, a, fmt, max_length) for p, a in texts[start:start + batch_size]]
        yield _pad([ids for ids, _ in encoded], [n for _, n in encoded], _pad_id(tokenizer), device)


@torch.no_grad()
def pooled_hidden(model: torch.nn.Module, batches: Iterator[Batch]) -> list[np.ndarray]:
    """Mean over real tokens of each hidden state: L + 1 arrays [N, d] (float32)."""
    parts = decoder_parts(model)
    pooled: list[list[np.ndarray]] = [[] for _ in range(parts.num_layers + 1)]
    for batch in batches:
        with capture_activations(model, mlp=False, hidden=True) as acts:
            parts.decoder(input_ids=batch.ids, attention_mask=batch.attention, use_cache=False)
        acts.check_complete()
        weights = batch.attention.unsqueeze(-1).to(torch.float32)
        for j, hidden in enumerate(acts.hidden):
            mean = (hidden.float() * weights).sum(1) / weights.sum(1)
            pooled[j].append(mean.cpu().numpy())
    return [np.concatenate(chunks) for chunks in pooled]
