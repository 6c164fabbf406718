"""Logit lens: each hidden state read through the final norm and the LM head (PAPER.md §3's c_j).

For continuation tokens t (the answer after its prompt), the value at hidden state j is the mean over
all such tokens of log p_j(x_t | x_<t) = log_softmax(head(norm(h_j[t-1])))[x_t]: minus the masked CE the
RepNoise ascent term pushes up, per layer. At j = L it is the model's own log-probability of the answer.
"""

from __future__ import annotations

from typing import Iterator

import torch

from harness.models.activations import capture_activations, decoder_parts
from harness.probe.features import Batch
from harness.train.losses import gather_rows, head_ce


@torch.no_grad()
def lens_logprobs(model: torch.nn.Module, batches: Iterator[Batch]) -> list[float]:
    """Mean log-probability per answer token at each of the L + 1 hidden states."""
    parts = decoder_parts(model)
    totals = torch.zeros(parts.num_layers + 1, dtype=torch.float64)
    count = 0
    for batch in batches:
        with capture_activations(model, mlp=False, hidden=True) as acts:
            parts.decoder(input_ids=batch.ids, attention_mask=batch.attention, use_cache=False)
        acts.check_complete()
        for j, hidden in enumerate(acts.hidden):
            rows, targets = gather_rows(hidden, batch.ids, batch.answer)
            if targets.numel():
                totals[j] -= head_ce(parts.norm(rows), targets, parts.head).double().sum()
        count += int(gather_rows(acts.hidden[0], batch.ids, batch.answer)[1].numel())
    if count == 0:
        raise ValueError("No answer tokens to score: every answer was truncated away (raise max_length).")
    return (totals / count).tolist()

