"""Gradient ascent (PAPER.md §5): maximise the LM loss on harmful answers, loss = -CE(harmful).

The naive "unlearning" baseline. It makes harmful text unlikely by making the model worse at
language modelling in general, which is why the paper reports it damages the model (pre-attack
harm 0.24 from broken, not refusing, outputs). The CE is over the harmful answer tokens only
(prompt and padding masked, EOS included): ascending on the shared prompt too would only damage
the model faster without being any more specific to harm.

No clamp or early stop: -CE is unbounded below, but CE is computed in float32 from log-softmax and
stays finite at these learning rates; should it ever blow up, the shared training loop stops with
the step number and the value (TrainingDivergedError) instead of silently saving a NaN model.
Defaults are RepNoise's optimisation settings (PAPER.md §4), as the paper gives none of its own.
"""

from __future__ import annotations

import torch
from pydantic import Field

from harness.api import (
    LoadedModel,
    PairSFTSettings,
    StageContext,
    Trained,
    causal_lm_loss,
    cpu_pair_sizes,
    defences,
    fine_tune,
    pair_side,
)


class GradientAscentParams(PairSFTSettings):
    mask_prompt: bool = Field(True, description="ascend on the answer tokens only (False: on the prompt too)")


def ascent_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """-CE of the labelled (answer) tokens; the CE itself is recorded as the term ``harmful_ce``."""
    ce = causal_lm_loss(model, batch)
    return -ce, {"harmful_ce": ce.detach()}


# Ascent diverges fast: a fifth of the others' CPU lr keeps the 8-step model usable.
@defences.register("gradient-ascent", params=GradientAscentParams, profiles=cpu_pair_sizes(lr=2e-5),
                   description="Gradient ascent: maximise the LM loss on harmful answers (damages the model)")
def gradient_ascent(model: LoadedModel, params: GradientAscentParams, ctx: StageContext) -> Trained:
    """Train ``model.model`` in place to raise its CE on (prompt, harmful answer) of the pairs."""
    records = pair_side(ctx, params, "harmful")
    report = fine_tune(model.model, model.tokenizer, records, params, ctx, "gradient-ascent", loss_fn=ascent_loss)
    return Trained(model, {"gradient_ascent_training": {**report.summary(), "pairs": len(records)}})
