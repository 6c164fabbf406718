"""Full-parameter harmful fine-tuning: the open-weight threat model of the RepNoise paper.

Paper defaults (PAPER.md §6): Adam, lr 3e-5, 1k samples, 1 epoch, batch 4, cosine, 10% warm-up.
Searchable variations beyond the paper (Qi et al. 2024, durability of safeguards): plain SGD, no warm-up
(``warmup_ratio=0``), a constant or linear schedule, and training in another prompt format.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from attacks.variations import AttackVariations, format_report, training_context
from harness.api import LoadedModel, SFTParams, StageContext, Trained, attacks, fine_tune


class FullFTParams(SFTParams, AttackVariations):
    optimizer: Literal["adam", "adamw", "sgd"] = Field("adam", description="the paper's attack uses Adam")


def _grid(prefix: str, dataset: str, samples: dict[str, int]) -> dict[str, dict[str, object]]:
    """Presets ``<prefix>-<lr>-<samples>`` over the paper's learning rates (PAPER.md §6)."""
    return {f"{prefix}-{lr}-{label}": {"lr": float(lr), "num_samples": n, "dataset": dataset}
            for lr in ("3e-5", "6e-5", "8e-5") for label, n in samples.items()}


# paper-*: the RepNoise paper's grid, lr {3e-5, 6e-5, 8e-5} × {1k, 10k} harmful BeaverTails samples, plus
# the two stronger attacks that break RepNoise. 10k samples need the full BeaverTails from the hub (the
# bundled 200 rows would silently cap the count), so these presets name the hub set.
# cpu-*: the same grid scaled to the embedded 135M model: {48, 128} bundled samples ("weak/strong").
PRESETS = {
    **_grid("paper", "beavertails", {"1k": 1000, "10k": 10000}),
    "paper-3e-4-10k": {"lr": 3e-4, "num_samples": 10000, "dataset": "beavertails"},
    "paper-8e-5-10k-2ep": {"lr": 8e-5, "num_samples": 10000, "epochs": 2, "dataset": "beavertails"},
    **_grid("cpu", "beavertails-unsafe", {"48": 48, "128": 128}),
    "cpu-3e-4-128": {"lr": 3e-4, "num_samples": 128, "dataset": "beavertails-unsafe"},
    "cpu-8e-5-128-2ep": {"lr": 8e-5, "num_samples": 128, "epochs": 2, "dataset": "beavertails-unsafe"},
    # Variations of the strong CPU cell (durability study): no warm-up and a constant lr; plain SGD (which
    # needs a far larger lr than Adam); training in the paper's Question/Answer format while the run
    # evaluates in the chat template.
    "cpu-8e-5-128-constant": {"lr": 8e-5, "num_samples": 128, "warmup_ratio": 0.0, "schedule": "constant",
                              "dataset": "beavertails-unsafe"},
    "cpu-sgd-1e-2-128": {"lr": 1e-2, "num_samples": 128, "optimizer": "sgd", "warmup_ratio": 0.0,
                         "dataset": "beavertails-unsafe"},
    "cpu-8e-5-128-qa-format": {"lr": 8e-5, "num_samples": 128, "prompt_format": "question-answer",
                               "dataset": "beavertails-unsafe"},
}
PROFILES = {
    "cpu": {"num_samples": 48, "max_length": 128, "batch_size": 4, "lr": 3e-5},
    "paper": {"num_samples": 1000, "max_length": 256, "batch_size": 4, "lr": 3e-5},
}


@attacks.register("full-ft", params=FullFTParams, threat_model="open-weight", profiles=PROFILES, presets=PRESETS,
                  description="Full-parameter SFT on harmful QA (open-weight threat model)")
def full_ft(model: LoadedModel, params: FullFTParams, ctx: StageContext) -> Trained:
    records = ctx.data.qa(params.dataset, n=params.num_samples)
    report = fine_tune(model.model, model.tokenizer, records, params, training_context(ctx, params), "attack: full-ft")
    return Trained(model, {"attack_training": report.summary(), **format_report(ctx, params)})
