"""Additional safety training (PAPER.md §5): SFT on the refusal side of the pairs.

The cheapest defence: teach the model to answer harmful prompts with refusals, with the same
next-token loss and tokenisation as the attacks (``harness.train.sft.fine_tune``), so it is exactly what
an attacker's SFT will later pull the other way. The paper gives no settings of its own for this
baseline; the defaults are RepNoise's (PAPER.md §4: Adam, lr 2e-5, batch 8, 1 epoch, 128 tokens)
so the baselines differ from RepNoise only in the objective.
"""

from __future__ import annotations

from harness.api import (
    LoadedModel,
    PairSFTSettings,
    StageContext,
    Trained,
    cpu_pair_sizes,
    defences,
    fine_tune,
    pair_side,
)


class SafetySFTParams(PairSFTSettings):
    """The paper's optimisation settings (PairSFTSettings); nothing of its own."""


@defences.register("safety-sft", params=SafetySFTParams, profiles=cpu_pair_sizes(lr=1e-4),
                   description="Additional safety training: SFT on (harmful prompt, refusal)")
def safety_sft(model: LoadedModel, params: SafetySFTParams, ctx: StageContext) -> Trained:
    """Fine-tune ``model.model`` in place on (prompt, harmless answer) of the pairs."""
    records = pair_side(ctx, params, "harmless")
    report = fine_tune(model.model, model.tokenizer, records, params, ctx, "safety-sft")
    return Trained(model, {"safety_sft_training": {**report.summary(), "pairs": len(records)}})
