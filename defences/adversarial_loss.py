"""Adversarial loss (PAPER.md §5): loss = CE(harmless) - lambda * CE(harmful), lambda = 0.1.

RepNoise without its two distinctive parts: no noise term, no layer-wise ascent (the final layer
only) and no log around the ascent term, which is why it is in the paper's table: it shows what
those parts add. Both CEs use RepNoise's masking, so the two defences differ only in the loss:
each side is scored on the positions where the harmful and harmless sequences differ
(``harness.train.losses.position_mask``, i.e. the answers, not the shared prompt), with one forward
over both sides and no full logits (``harness.train.losses.pair_ces``).

Unlike -log(CE + 1), the linear ascent term has no diminishing return, so with a large lambda or
lr the harmful CE can run away; the shared loop's NaN/inf check stops training if it does.
Defaults are RepNoise's optimisation settings (PAPER.md §4).
"""

from __future__ import annotations

from functools import partial

import torch
from pydantic import Field

from harness.api import (
    LoadedModel,
    PairDefenceSettings,
    StageContext,
    Trained,
    TrainSettings,
    collate_pairs,
    cpu_pair_sizes,
    defences,
    encode_pair,
    pair_ces,
    position_mask,
    train,
)


class AdversarialLossParams(PairDefenceSettings):
    lambda_: float = Field(0.1, ge=0, description="weight of the ascent term -CE(harmful) (paper: 0.1)")


def adversarial_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], *, lambda_: float, chunk_rows: int | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CE(harmless) - lambda_ * CE(harmful) on the position mask; both CEs are recorded as terms."""
    mask = position_mask(batch["harmful_input_ids"], batch["harmless_input_ids"])
    harmful, harmless = pair_ces(model, batch, mask, mask, chunk_rows=chunk_rows)
    return harmless - lambda_ * harmful, {"harmless_ce": harmless.detach(), "harmful_ce": harmful.detach()}


@defences.register("adversarial-loss", params=AdversarialLossParams, profiles=cpu_pair_sizes(lr=1e-4),
                   description="Adversarial loss: CE(refusal) - 0.1 * CE(harmful answer), final layer only")
def adversarial_loss_defence(model: LoadedModel, params: AdversarialLossParams, ctx: StageContext) -> Trained:
    """Train ``model.model`` in place on the pairs with the adversarial loss."""
    tokenizer = model.tokenizer
    pairs = ctx.data.pairs(params.pairs, n=params.num_pairs)
    examples = [
        encode_pair(tokenizer, p.prompt, p.harmful, p.harmless, ctx.prompt_format, params.max_length) for p in pairs
    ]
    settings = TrainSettings.model_validate(params.model_dump(include=set(TrainSettings.model_fields)))
    report = train(
        model.model,
        examples,
        partial(collate_pairs, pad_id=tokenizer.eos_token_id),
        partial(adversarial_loss, lambda_=params.lambda_),
        settings,
        ctx,
        description="adversarial-loss",
    )
    return Trained(model, {"adversarial_loss_history": report.history,
                           "adversarial_loss_training": {**report.summary(), "pairs": len(examples)}})
