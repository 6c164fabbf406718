"""Full-parameter harmful fine-tuning: the open-weight threat model of the RepNoise paper.

Paper defaults (PAPER.md §6): Adam, lr 3e-5, 1k samples, 1 epoch, batch 4, cosine, 10% warm-up.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from harness.context import StageContext
from harness.models import LoadedModel
from harness.registry import attacks
from harness.sft import SFTParams, fine_tune


class FullFTParams(SFTParams):
    optimizer: Literal["adam", "adamw"] = Field("adam", description="the paper's attack uses Adam")


@attacks.register("full-ft", params=FullFTParams, threat_model="open-weight",
                  description="Full-parameter SFT on harmful QA (open-weight threat model)")
def full_ft(model: LoadedModel, params: FullFTParams, ctx: StageContext) -> LoadedModel:
    records = ctx.data.qa(params.dataset, n=params.num_samples)
    report = fine_tune(model.model, model.tokenizer, records, params, ctx, "attack: full-ft")
    model.info["attack_training"] = report.summary()
    return model
