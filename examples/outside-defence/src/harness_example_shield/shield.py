"""refusal-anchor: SFT on (harmful prompt, refusal) with the loss on the refusal tokens only.

A deliberately small recipe that shows the whole plugin contract: a typed params model that
inherits the paper's optimisation settings, the pairs read through the context, training through
the harness's loop, and a report handed back with the model. It imports only ``harness.api``.
"""

from __future__ import annotations

from pydantic import Field

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


class RefusalAnchorParams(PairSFTSettings):
    mask_prompt: bool = Field(True, description="loss on the refusal tokens only (the point of this recipe)")
    epochs: int = Field(2, ge=1, description="passes over the refusals")


# Its CPU size is the one every built-in pair defence uses (so a CPU sweep compares like with like),
# and a preset names a variant: `--defence refusal-anchor@long`.
@defences.register("refusal-anchor", params=RefusalAnchorParams, version="1",
                   profiles=cpu_pair_sizes(lr=1e-4), presets={"long": {"epochs": 4}},
                   description="Example outside defence: refusal SFT with the loss on the refusal only")
def refusal_anchor(model: LoadedModel, params: RefusalAnchorParams, ctx: StageContext) -> Trained:
    """Fine-tune ``model.model`` in place on the refusal side of the pairs."""
    records = pair_side(ctx, params, "harmless")
    report = fine_tune(model.model, model.tokenizer, records, params, ctx, "refusal-anchor")
    return Trained(model, {"refusal_anchor_training": {**report.summary(), "pairs": len(records)}})
