"""Distance to noise: per layer, the MMD between harmful activations and Gaussian noise (PAPER.md §3's N).

Built exactly as RepNoise's noise term: the output of each layer's MLP block (before the residual add)
on the harmful sequence, zero outside the mask (here: the harmful answer's tokens), each example flattened
to one [T·d] vector, against standard Gaussian noise of the same shape, masked and flattened the same way,
through :func:`harness.train.losses.mmd`, per batch of B texts, averaged over batches. One noise draw per seed.
"""

from __future__ import annotations

from typing import Iterator

import torch

from harness.models.activations import capture_activations, decoder_parts
from harness.probe.features import Batch
from harness.train.losses import mmd


def masked_flat(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T, d] → [B, T·d] with positions outside ``mask`` [B, T] set to zero."""
    return (values * mask.unsqueeze(-1).to(values.dtype)).reshape(values.shape[0], -1)


@torch.no_grad()
def mmd_to_noise(model: torch.nn.Module, batches: Iterator[Batch], seeds: list[int]) -> list[list[float]]:
    """``[seed][layer]``: mean over batches of MMD(masked MLP output of layer i, masked noise), L values per seed.
    Batches of one text are skipped (an MMD of one point against one point says nothing)."""
    parts = decoder_parts(model)
    sums = torch.zeros(len(seeds), parts.num_layers, dtype=torch.float64)
    used = 0
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    for batch in batches:
        if batch.ids.shape[0] < 2:
            continue
        with capture_activations(model, mlp=True, hidden=False) as acts:
            parts.decoder(input_ids=batch.ids, attention_mask=batch.attention, use_cache=False)
        acts.check_complete()
        for s, generator in enumerate(generators):
            for i, output in enumerate(acts.mlp):
                noise = torch.randn(output.shape, generator=generator, dtype=torch.float32).to(output)
                sums[s, i] += float(mmd(masked_flat(output, batch.answer), masked_flat(noise, batch.answer)))
        used += 1
    if used == 0:
        raise ValueError("MMD to noise needs at least one batch of two or more texts (raise num_pairs).")
    return (sums / used).tolist()
