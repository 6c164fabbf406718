"""Additional safety training (PAPER.md §5): SFT on the refusal side of the pairs.

The cheapest defence: teach the model to answer harmful prompts with refusals, with the same
next-token loss and tokenisation as the attacks (``harness.sft.fine_tune``), so it is exactly what
an attacker's SFT will later pull the other way. The paper gives no settings of its own for this
baseline; the defaults are RepNoise's (PAPER.md §4: Adam, lr 2e-5, batch 8, 1 epoch, 128 tokens)
so the baselines differ from RepNoise only in the objective.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from harness.context import StageContext
from harness.models import LoadedModel
from harness.registry import defences
from harness.sft import PairSettings, SFTSettings, fine_tune, pair_side


class SafetySFTParams(PairSettings, SFTSettings):
    lr: float = Field(2e-5, gt=0, description="peak learning rate (RepNoise's, PAPER.md §4)")
    batch_size: int = Field(8, ge=1, description="examples per micro-batch")
    optimizer: Literal["adam", "adamw"] = Field("adam", description="Adam, no weight decay")
    max_length: int = Field(128, ge=8, description="tokens per example (prompt + refusal), truncated")


@defences.register("safety-sft", params=SafetySFTParams,
                   description="Additional safety training: SFT on (harmful prompt, refusal)")
def safety_sft(model: LoadedModel, params: SafetySFTParams, ctx: StageContext) -> LoadedModel:
    """Fine-tune ``model.model`` in place on (prompt, harmless answer) of the pairs."""
    records = pair_side(ctx, params, "harmless")
    report = fine_tune(model.model, model.tokenizer, records, params, ctx, "safety-sft")
    model.info["safety_sft_training"] = {**report.summary(), "pairs": len(records)}
    return model
