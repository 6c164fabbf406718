"""Booster (Huang, Hu, Ilhan, Tekin, Liu 2024, "Booster: Tackling Harmful Fine-tuning for Large Language
Models via Attenuating Harmful Perturbation", arXiv:2409.01586, ICLR 2025).

Alignment-stage defence: the alignment loss plus lambda times how much one simulated harmful step would
lower the harmful loss, so that the aligned model sits where harmful gradient steps achieve little:

    min_w  f(w) + lambda * ( h(w) - h(w - alpha * grad h(w) / ||grad h(w)||) )

with f the SFT loss on (harmful prompt, refusal), h the SFT loss on (harmful prompt, harmful answer)
and ||.|| the global L2 norm over the trained weights. As in the paper (its Algorithm 1), the gradient
treats the normalised harmful direction as a constant (first order; no Hessian-vector product), so each
step uses three gradients:

1. g_h  = grad h(w)                 (harmful batch)
2. g_h' = grad h(w')  with w' = w - alpha * g_h / ||g_h||   (same harmful batch, perturbed weights)
3. g_f  = grad f(w)                 (alignment batch)

and steps on g_f + lambda * (g_h - g_h'). Passes 1 and 2 take ``torch.autograd.grad`` (pass 2 through
``torch.func.functional_call`` on the perturbed weights, so the model's own weights are never written
and nothing needs restoring); the returned loss has value f + lambda * (h(w) - h(w')) and gradient
exactly g_f + lambda * (g_h - g_h'), so the shared training loop back-propagates and steps on it
unchanged. Costs three forwards and three backwards per step.

Defaults: lambda = 5 and alpha = 0.1, those of the authors' released alignment script.
Deviations, named:
- data: the paper draws the alignment and harmful batches from two BeaverTails subsets (5000 each);
  here both come from the same pairs (refusal and harmful answer of the same prompts), one pair per row
  of both batches, as every pair-based defence of this harness does;
- weights: the paper trains a LoRA adapter (lr 5e-4, 20 epochs, batch 10, AdamW with weight decay
  0.1, constant schedule); here all weights are trained with RepNoise's optimisation settings
  (PAPER.md §4) for comparability with the other defences, as Vaccine does here;
- the norm is floored at the smallest normal float instead of adding 1e-7 (a zero harmful gradient
  gives no perturbation rather than a division by zero). Refuses gradient checkpointing (pass 2's
  functional call would be recomputed against the unperturbed weights).
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
    TrainSettings,
    causal_lm_loss,
    collate_sft,
    cpu_pair_sizes,
    defences,
    encode_sft,
    train,
    unwrap,
)

SIDES = ("harmless", "harmful")  # alignment batch (refusals), harmful batch (harmful answers)


class BoosterParams(PairSFTSettings):
    lam: float = Field(5.0, ge=0, description="lambda: weight of the harmful-loss-reduction regulariser (released: 5)")
    alpha: float = Field(0.1, gt=0, description="alpha: step size of the simulated harmful step, along the "
                                                "unit harmful gradient (released: 0.1)")


def _side(batch: dict[str, torch.Tensor], side: str) -> dict[str, torch.Tensor]:
    return {key: batch[f"{side}_{key}"] for key in ("input_ids", "attention_mask", "labels")}


def _trained(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise HarnessError("Booster: the model has no trainable weights.")
    return named


def global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.sqrt(sum(t.float().pow(2).sum() for t in tensors))


def booster_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], *, lam: float, alpha: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """f(w) + lam * (h(w) - h(w')) by value, g_f + lam * (g_h - g_h') by gradient (see the module doc)."""
    if getattr(unwrap(model), "is_gradient_checkpointing", False):
        raise HarnessError("Booster cannot run with gradient checkpointing (the perturbed pass would be lost).")
    named = _trained(model)
    weights = [p for _, p in named]
    harmful = _side(batch, "harmful")
    harmful_loss = causal_lm_loss(model, harmful)
    g_h = torch.autograd.grad(harmful_loss, weights)
    scale = alpha / global_norm(list(g_h)).clamp_min(torch.finfo(torch.float32).tiny)
    perturbed = {name: (p.detach() - (g.float() * scale).to(p.dtype)).requires_grad_()
                 for (name, p), g in zip(named, g_h)}
    logits = torch.func.functional_call(
        model, perturbed, args=(), kwargs={"input_ids": harmful["input_ids"],
                                           "attention_mask": harmful["attention_mask"]}).logits
    harmful_after = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), harmful["labels"][:, 1:].flatten(), ignore_index=-100)
    g_h_after = torch.autograd.grad(harmful_after, list(perturbed.values()))
    alignment_loss = causal_lm_loss(model, _side(batch, "harmless"))
    reduction = (harmful_loss - harmful_after).detach()
    # Linear in w with slope g_h - g_h' and value 0: its gradient is the lambda-term, its value adds nothing.
    surrogate = sum(((p - p.detach()) * (a - b).to(p.dtype)).sum() for p, a, b in zip(weights, g_h, g_h_after))
    loss = alignment_loss + lam * (reduction + surrogate)
    return loss, {"alignment_loss": alignment_loss.detach(), "harmful_loss": harmful_loss.detach(),
                  "harmful_loss_after_step": harmful_after.detach(), "harmful_reduction": reduction}


def collate_booster(examples: list[dict[str, dict[str, list[int]]]], pad_id: int,
                    mask_padding: bool) -> dict[str, torch.Tensor]:
    """Both sides of each pair as SFT tensors, keys prefixed ``harmless_`` / ``harmful_``."""
    batch: dict[str, torch.Tensor] = {}
    for side in SIDES:
        collated = collate_sft([e[side] for e in examples], pad_id, mask_padding)
        batch.update({f"{side}_{key}": value for key, value in collated.items()})
    return batch


@defences.register("booster", params=BoosterParams, profiles=cpu_pair_sizes(lr=1e-4),
                   description="Booster: alignment SFT plus lambda x the harmful-loss drop after one simulated "
                               "harmful step")
def booster(model: LoadedModel, params: BoosterParams, ctx: StageContext) -> Trained:
    """Train ``model.model`` in place on the pairs with Booster's regularised alignment loss."""
    pairs = ctx.data.pairs(params.pairs, n=params.num_pairs)
    tokenizer: Any = model.tokenizer
    examples = [{side: encode_sft(tokenizer, p.prompt, getattr(p, side), ctx.prompt_format, params.max_length,
                                  params.mask_prompt) for side in SIDES} for p in pairs]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    settings = TrainSettings.model_validate(params.model_dump(include=set(TrainSettings.model_fields)))
    report = train(model.model, examples, partial(collate_booster, pad_id=pad_id, mask_padding=params.mask_padding),
                   partial(booster_loss, lam=params.lam, alpha=params.alpha), settings, ctx, description="booster")
    return Trained(model, {"booster_history": report.history,
                           "booster_training": {**report.summary(), "pairs": len(pairs), "lam": params.lam,
                                                "alpha": params.alpha}})
