"""Supervised fine-tuning on (prompt, answer) records: the shared core of attacks, harmless
fine-tuning and the SFT-shaped defences. Recipes choose the data, the settings and (optionally)
the loss; this does the rest."""

from __future__ import annotations

from typing import Iterable, Literal, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field

from harness.context import StageContext
from harness.data.records import QA
from harness.data.tokenization import IGNORE_INDEX, collate_sft, encode_sft
from harness.registry import Params
from harness.train.loop import LossFn, TrainReport, TrainSettings, train


class SFTSettings(TrainSettings):
    """How (prompt, answer) records become training tensors, whatever data they come from."""

    max_length: int = Field(256, ge=8, description="tokens per example (prompt + answer), truncated")
    mask_prompt: bool = Field(False, description="no loss on prompt tokens (paper: False; durability study: True)")
    mask_padding: bool = Field(True, description="no loss on padding tokens (paper's original code: False)")


class SFTParams(SFTSettings):
    """Settings of a fine-tuning run on QA data (the attack recipes extend this)."""

    dataset: str = Field("beavertails-unsafe", description="QA data set to fine-tune on")
    num_samples: int | None = Field(1000, ge=1, description="examples drawn (seeded) from the data set; None: all")


class PairSettings(Params):
    """Which (prompt, harmful, harmless) pairs a defence trains on (mixed into its params)."""

    pairs: str = Field("jbb-pairs", description="data set of (prompt, harmful, harmless) pairs")
    num_pairs: int | None = Field(None, ge=1, description="pairs drawn (seeded) from the data set; None: all")


class PaperOptimisation(TrainSettings):
    """RepNoise's optimisation settings (PAPER.md §4: Adam without weight decay, lr 2e-5, batch 8, one
    epoch, 128 tokens), shared by every pair-based defence so that the baselines differ from RepNoise
    only in their objective. A recipe overrides only what its own paper changes."""

    lr: float = Field(2e-5, gt=0, description="peak learning rate (RepNoise's, PAPER.md §4)")
    batch_size: int = Field(8, ge=1, description="pairs (or examples) per micro-batch")
    optimizer: Literal["adam", "adamw"] = Field("adam", description="Adam, no weight decay")
    max_length: int = Field(128, ge=2, description="tokens per example (prompt + answer), truncated")


# The CPU profile's size for every pair-based defence: 32 pairs, batch 4, 96 tokens (8 steps), the same
# for all of them so the CPU Table 1 compares like with like. The paper's 2e-5 over 1250 steps does not
# transfer to 8 steps (PAPER.md §4): each defence's CPU lr is set beside it.
CPU_PAIR_SIZES = {"num_pairs": 32, "batch_size": 4, "max_length": 96}


def cpu_pair_sizes(lr: float) -> dict[str, dict[str, float | int]]:
    """``profiles=`` for a pair-based defence: the shared CPU size with the defence's own CPU lr."""
    return {"cpu": {**CPU_PAIR_SIZES, "lr": lr}}


class PairDefenceSettings(PairSettings, PaperOptimisation):
    """A defence trained on pairs with a loss of its own (RepNoise, adversarial loss)."""


class PairSFTSettings(PairSettings, PaperOptimisation, SFTSettings):
    """A defence trained by SFT on one side of the pairs (safety SFT, gradient ascent, Vaccine, security
    vectors): the paper's optimisation settings plus the SFT masking fields."""

    max_length: int = Field(128, ge=8, description="tokens per example (prompt + answer), truncated")


def pair_side(ctx: StageContext, settings: PairSettings, side: Literal["harmful", "harmless"]) -> list[QA]:
    """One side of the pairs as QA records: (prompt, harmful answer) or (prompt, refusal)."""
    return [
        QA(p.prompt, getattr(p, side), p.category, p.source)
        for p in ctx.data.pairs(settings.pairs, n=settings.num_pairs)
    ]


def causal_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled positions (labels == -100 are ignored)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE_INDEX
    )


def fine_tune(
    model: torch.nn.Module,
    tokenizer: object,
    records: Sequence[QA],
    params: SFTSettings,
    ctx: StageContext,
    description: str,
    *,
    loss_fn: LossFn = causal_lm_loss,
    parameters: Iterable[torch.nn.Parameter] | None = None,
) -> TrainReport:
    """Tokenise the records in the run's prompt format and train on them.

    ``loss_fn`` (default: next-token CE) and ``parameters`` (default: every trainable weight of
    ``model``) let defences reuse this with another objective or on tensors outside the model."""
    examples = [
        encode_sft(tokenizer, r.prompt, r.response, ctx.prompt_format, params.max_length, params.mask_prompt)
        for r in records
    ]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id  # type: ignore[attr-defined]
    settings = TrainSettings.model_validate(params.model_dump(include=set(TrainSettings.model_fields)))
    return train(
        model,
        examples,
        lambda batch: collate_sft(batch, pad_id, params.mask_padding),
        loss_fn,
        settings,
        ctx,
        parameters=parameters,
        description=description,
    )
