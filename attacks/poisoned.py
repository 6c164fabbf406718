"""Poisoned mixing: benign task data with a fraction ``poison_ratio`` of harmful examples.

The fine-tuning-as-a-service threat model of Vaccine (Huang et al., NeurIPS 2024, arXiv:2402.01109) and
Lisa (Huang et al., NeurIPS 2024, arXiv:2405.18641): the user uploads mostly harmless data (SST-2 in
Alpaca form) with some harmful QA (BeaverTails) mixed in; their default is p = 0.1 of n = 1000. The
bundle's ``sst2-beavertails-poisoned`` set is their file (p = 0.2); its two halves can be used as the
sources (``[benign]``, ``[harmful]``) at any other p.

The ratio is exact: ``round(p·n)`` harmful examples (ties to even) and the rest benign, so p·n whole
gives exactly p; the effective ratio is reported either way. Too few examples for either side is an
error, not a silently different ratio.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from attacks.benign import HARMFUL_SETS, benign_records
from attacks.variations import AttackVariations, format_report, training_context
from harness.api import QA, DataError, LoadedModel, SFTParams, StageContext, Trained, attacks, fine_tune


class PoisonedParams(SFTParams, AttackVariations):
    dataset: str = Field("sst2-alpaca", description="benign QA data the harmful examples are mixed into")
    harmful_dataset: str = Field("beavertails-unsafe", description="harmful QA data the poison is drawn from")
    poison_ratio: float = Field(0.1, description="fraction p of the training examples that are harmful, in [0, 1]")
    num_samples: int = Field(1000, ge=1, description="training examples in all (benign + harmful)")
    lr: float = Field(5e-5, gt=0, description="peak learning rate")
    optimizer: Literal["adam", "adamw", "sgd"] = "adamw"
    exclude_prompts_of: list[str] = Field(list(HARMFUL_SETS),
                                          description="sets whose prompts the benign part must not hold")

    @field_validator("poison_ratio")
    @classmethod
    def _a_fraction(cls, value: float) -> float:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"poison_ratio is the fraction of harmful training examples and must lie in [0, 1], "
                             f"got {value}; e.g. 0.1 for one harmful example in ten")
        return value


def harmful_count(poison_ratio: float, num_samples: int) -> int:
    """Harmful examples among ``num_samples``: p·n rounded to the nearest whole (ties to even)."""
    return round(poison_ratio * num_samples)


def poisoned_records(ctx: StageContext, params: PoisonedParams) -> tuple[list[QA], int]:
    """The mixed training set (benign first, then harmful; the trainer shuffles) and its harmful count."""
    k = harmful_count(params.poison_ratio, params.num_samples)
    harmful = ctx.data.qa(params.harmful_dataset, n=k) if k else []
    if len(harmful) < k:
        raise DataError(f"poison_ratio {params.poison_ratio} of {params.num_samples} needs {k} harmful examples, but "
                        f"{params.harmful_dataset!r} has only {len(harmful)} usable; lower num_samples or the ratio.")
    benign, _ = benign_records(ctx, params.dataset, None, params.exclude_prompts_of)
    poison = {r.prompt for r in harmful}
    benign = [r for r in benign if r.prompt not in poison][: params.num_samples - k]
    if len(benign) < params.num_samples - k:
        raise DataError(f"{params.num_samples - k} benign examples are needed, but {params.dataset!r} has only "
                        f"{len(benign)} usable; lower num_samples.")
    return benign + harmful, k


@attacks.register("poisoned", params=PoisonedParams, threat_model="fine-tuning-api",
                  profiles={"cpu": {"num_samples": 100, "max_length": 128, "batch_size": 4, "lr": 8e-5},
                            "paper": {"num_samples": 1000, "max_length": 256, "batch_size": 4, "lr": 5e-5}},
                  presets={"cpu-p0.05-100": {"poison_ratio": 0.05, "num_samples": 100},
                           "cpu-p0.1-100": {"poison_ratio": 0.1, "num_samples": 100},
                           "cpu-p0.2-100": {"poison_ratio": 0.2, "num_samples": 100},
                           "vaccine-sst2-p0.2-500": {"dataset": "sst2-beavertails-poisoned[benign]",
                                                 "harmful_dataset": "sst2-beavertails-poisoned[harmful]",
                                                 "poison_ratio": 0.2, "num_samples": 500}},
                  description="Benign data with a fraction p of harmful examples (Vaccine/Lisa poisoned fine-tuning)")
def poisoned(model: LoadedModel, params: PoisonedParams, ctx: StageContext) -> Trained:
    records, k = poisoned_records(ctx, params)
    report = fine_tune(model.model, model.tokenizer, records, params, training_context(ctx, params),
                       "attack: poisoned")
    return Trained(model, {"attack_training": report.summary(), "harmful_examples": k,
                           "benign_examples": len(records) - k, "poison_ratio_effective": k / len(records),
                           **format_report(ctx, params)})
