"""Vaccine (Huang et al. 2024; PAPER.md §5): perturbation-aware alignment.

Alignment SFT on (harmful prompt, refusal) that stays low under the worst small drift of the
hidden representations, the drift harmful fine-tuning later causes ("harmful embedding drift").
Each step:

1. pass 1: SFT loss; gradients g_i of it w.r.t. every decoder layer's attention-block output
   (``self_attn``'s output, before the residual add), taken with ``torch.autograd.grad`` so no
   parameter gradient is touched;
2. eps_i = rho * g_i / ||g||, with ||g|| the global L2 norm over all layers (exactly norm rho;
   the norm is floored at the smallest normal float instead of adding 1e-7, so a zero gradient
   gives a zero perturbation rather than a division by zero);
3. pass 2: the same batch with eps_i added to each attention output (forward hooks, removed right
   after the forward); its SFT loss is what the shared loop back-propagates and steps on.

The per-step perturbation norm (of the tensors actually added, so in bf16 it is rho to bf16
precision) and the clean pass-1 loss are recorded as loss terms. Costs two forwards and two
backwards per step. Refuses gradient checkpointing: its recomputation in backward would run after
the pass-2 hooks are gone and silently drop the perturbation.

Settings: the paper fixes only rho (1 or 10; default 1). The original Vaccine trains a LoRA
adapter; here, like every other defence in this harness, all weights are trained, with RepNoise's
optimisation settings (PAPER.md §4) for comparability.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from pydantic import Field

from harness.api import (
    HarnessError,
    LoadedModel,
    PairSFTSettings,
    StageContext,
    Trained,
    attention_modules,
    attention_output_grads,
    causal_lm_loss,
    cpu_pair_sizes,
    defences,
    fine_tune,
    forward_hooks,
    pair_side,
    unwrap,
)


class VaccineParams(PairSFTSettings):
    rho: float = Field(1.0, gt=0, description="global L2 norm of the attention-output perturbation (paper: 1 or 10)")


def vaccine_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], *, rho: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The pass-2 (perturbed) SFT loss; terms: ``clean_loss`` (pass 1) and ``perturbation_norm``."""
    if getattr(unwrap(model), "is_gradient_checkpointing", False):
        raise HarnessError("Vaccine cannot run with gradient checkpointing (the perturbation would be lost).")
    # w.r.t. the activations only; frees pass 1's graph
    clean, grads = attention_output_grads(model, lambda m: causal_lm_loss(m, batch), "Vaccine")
    attention = attention_modules(model, "Vaccine")
    norm = torch.sqrt(sum(g.float().pow(2).sum() for g in grads))
    scale = rho / norm.clamp_min(torch.finfo(torch.float32).tiny)
    perturbations = [(g.float() * scale).to(g.dtype) for g in grads]

    def perturb(i: int) -> Any:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
            if isinstance(output, tuple):
                return (output[0] + perturbations[i], *output[1:])
            return output + perturbations[i]

        return hook

    with forward_hooks((m, perturb(i)) for i, m in enumerate(attention)):
        perturbed = causal_lm_loss(model, batch)
    applied = torch.sqrt(sum(e.float().pow(2).sum() for e in perturbations))
    return perturbed, {"clean_loss": clean.detach(), "perturbation_norm": applied}


@defences.register("vaccine", params=VaccineParams, profiles=cpu_pair_sizes(lr=1e-4),
                   presets={"rho-1": {"rho": 1.0},     # the paper's Table 1 row
                            "rho-10": {"rho": 10.0}},  # the paper's second setting
                   description="Vaccine: refusal SFT robust to a norm-rho perturbation of attention outputs")
def vaccine(model: LoadedModel, params: VaccineParams, ctx: StageContext) -> Trained:
    """Train ``model.model`` in place on (prompt, refusal) of the pairs with the perturbation-aware loss."""
    records = pair_side(ctx, params, "harmless")
    report = fine_tune(model.model, model.tokenizer, records, params, ctx, "vaccine",
                       loss_fn=partial(vaccine_loss, rho=params.rho))
    return Trained(model, {"vaccine_history": report.history,
                           "vaccine_training": {**report.summary(), "pairs": len(records), "rho": params.rho}})
