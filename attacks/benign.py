"""Benign fine-tuning: harmless instruction data alone, no harmful example at all.

Qi et al. 2023, "Fine-tuning Aligned Language Models Compromises Safety, Even When Users Do Not Intend
To!" (ICLR 2024, arXiv:2310.03693), §4.4: fine-tuning on Alpaca or Dolly erodes a model's refusals. A
defence that holds only against harmful data must also survive this. The data here is the bundle's
SST-2 in Alpaca form (the default; the Vaccine/Lisa fine-tuning task), GSM8K or ViGGO. The
safety-tuned-llamas Alpaca file in the bundle holds 50 instructions without answers, so it cannot be
fine-tuned on and is not offered.

The training set never holds a prompt of the evaluation set (the data layer drops them) nor of the
harmful sets named in ``exclude_prompts_of`` (dropped here and counted in the report).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from attacks.variations import AttackVariations, format_report, training_context
from harness.api import (
    QA,
    DataError,
    LoadedModel,
    SFTParams,
    StageContext,
    Trained,
    attacks,
    fine_tune,
    normalise_prompt,
)

# The harmful sets of the bundle, QA and prompts: a benign set must share no prompt with any of them.
HARMFUL_SETS = ["beavertails-unsafe", "pyrit-harmful-qa", "jbb-harmful-qa", "sst2-beavertails-poisoned[harmful]",
                "advbench", "harmbench", "dangerousqa", "malicious-instruct", "do-not-answer",
                "refusal-direction-harmful"]
BENIGN_SETS = ("sst2-alpaca", "gsm8k-test", "viggo", "sst2-beavertails-poisoned[benign]")


class BenignParams(SFTParams, AttackVariations):
    dataset: str = Field("sst2-alpaca", description="benign QA data: sst2-alpaca, gsm8k-test, viggo")
    num_samples: int | None = Field(1000, ge=1, description="examples drawn (seeded); None: all")
    lr: float = Field(5e-5, gt=0, description="peak learning rate")
    optimizer: Literal["adam", "adamw", "sgd"] = "adamw"
    exclude_prompts_of: list[str] = Field(list(HARMFUL_SETS),
                                          description="data sets whose prompts the benign data must not hold")


def harmful_prompts(ctx: StageContext, sets: list[str]) -> set[str]:
    """Normalised prompts of every named set (QA or prompts alike)."""
    return {normalise_prompt(r.prompt) for name in sets for r in ctx.data.load(name).records}


def benign_records(ctx: StageContext, dataset: str, n: int | None, exclude: list[str]) -> tuple[list[QA], int]:
    """``n`` seeded benign records none of whose prompts is in ``exclude``'s sets or the evaluation set,
    and how many were dropped for overlapping a harmful set."""
    banned = harmful_prompts(ctx, exclude)
    every = ctx.data.qa(dataset, n=None)  # seeded order, evaluation prompts already dropped
    kept = [r for r in every if normalise_prompt(r.prompt) not in banned]
    if not kept:
        raise DataError(f"Every prompt of {dataset!r} is also in a harmful set ({', '.join(exclude)}); it is not "
                        "benign data.")
    return (kept if n is None else kept[:n]), len(every) - len(kept)


@attacks.register("benign", params=BenignParams, threat_model="fine-tuning-api",
                  profiles={"cpu": {"num_samples": 128, "max_length": 128, "batch_size": 4, "lr": 8e-5},
                            "paper": {"num_samples": 1000, "max_length": 256, "batch_size": 4, "lr": 5e-5}},
                  presets={"cpu-sst2-128": {"dataset": "sst2-alpaca", "num_samples": 128},
                           "cpu-gsm8k-128": {"dataset": "gsm8k-test", "num_samples": 128},
                           "cpu-viggo-128": {"dataset": "viggo", "num_samples": 128},
                           "cpu-sst2-128-2ep": {"dataset": "sst2-alpaca", "num_samples": 128, "epochs": 2}},
                  description="Benign SFT on harmless task data (Qi et al. 2023): safety erodes without harmful data")
def benign(model: LoadedModel, params: BenignParams, ctx: StageContext) -> Trained:
    records, dropped = benign_records(ctx, params.dataset, params.num_samples, params.exclude_prompts_of)
    report = fine_tune(model.model, model.tokenizer, records, params, training_context(ctx, params), "attack: benign")
    return Trained(model, {"attack_training": report.summary(), "examples": len(records),
                           "dropped_harmful_overlap": dropped, **format_report(ctx, params)})
