"""Weight change per layer: ||W_after - W_before||_2 over all of a layer's parameters (the paper's Fig. 2).

Index 0 is the token embedding, index j (1..L) decoder layer j, the numbering of the hidden states, so the
change of a layer sits at the hidden state it produces. LoRA stages are compared after merging their
adapter (what the attacked model computes with). ``relative`` divides by ||W_before||.
"""

from __future__ import annotations

import math

import torch

from harness.models.activations import decoder_parts, unwrap

Snapshot = list[dict[str, torch.Tensor]]  # [index] {parameter name: values on the CPU}


def snapshot(model: torch.nn.Module) -> Snapshot:
    """A CPU copy of every layer's parameters, by index (0 = embeddings, j = decoder layer j)."""
    base = unwrap(model)
    parts = decoder_parts(base)
    embeddings = base.get_input_embeddings()
    modules = [embeddings, *parts.layers]
    return [{name: p.detach().to("cpu", copy=True) for name, p in module.named_parameters()} for module in modules]


def weight_change(after: Snapshot, before: Snapshot) -> dict[str, list[float]]:
    """Absolute and relative L2 change per index; the two snapshots must have the same layout."""
    if len(after) != len(before):
        raise ValueError(f"Models differ in depth: {len(after) - 1} and {len(before) - 1} layers.")
    absolute, relative = [], []
    for index, (a, b) in enumerate(zip(after, before)):
        if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
            raise ValueError(f"Layer {index} has different parameters in the two models.")
        change = math.sqrt(sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a))
        size = math.sqrt(sum(float(b[k].double().pow(2).sum()) for k in b))
        absolute.append(change)
        relative.append(change / size if size else 0.0)
    return {"absolute": absolute, "relative": relative}
