"""Lisa (Huang, Hu, Ilhan, Tekin, Liu 2024, "Lisa: Lazy Safety Alignment for Large Language Models against
Harmful Fine-tuning Attack", arXiv:2405.18641, NeurIPS 2024).

A fine-tuning-stage defence: the service provider runs the user's fine-tuning itself (the
fine-tuning-API threat model) and interleaves it with alignment data. Bi-State Optimisation (BSO)
alternates ``alignment_steps`` (K1) optimizer steps on the alignment data with ``finetune_steps`` (K2)
steps on the user's data, starting with alignment; Lisa adds a proximal term to each step,

    loss = state loss + rho / 2 * ||w - w_anchor||^2,

with w_anchor the weights at which the current state began (the last switching iterate; the starting
weights for the first state; the released code does the same), summed over the weights the fine-tuning
trains. It keeps each state from drifting far from the switching point, the "excess drift" the paper
finds makes BSO unstable when K1 is small. Alignment steps replace the user's batch by an alignment batch
of the same size (cycled through the alignment data in a seeded order) and use the next-token loss; user
steps keep the attack's batch and loss, so the attack's own step count, schedule and optimizer are
unchanged (the released code likewise drops the user's batch in alignment steps).

In the harness: the defend stage is the paper's alignment stage, SFT on (harmful prompt, refusal) of the
pairs (``alignment_sft``), and it stores those alignment records (JSON) for the attack. The
``during_attack`` hook then wraps every training loop the attack runs (``intercept_training``) with the
schedule above; a stage that runs no such loop is an error, not a silently undefended attack.

Defaults are the paper's experiments' (its released script: rho = 1, K1 = 100, K2 = 900). Deviations,
named: the alignment data are the refusal side of the pairs (the paper: 10,000 BeaverTails alignment
samples); the alignment stage trains all weights with RepNoise's optimisation settings (the paper: LoRA);
states switch per optimizer step (the released code counts micro-batches, with no gradient accumulation
in its runs). The released code also leaves the proximal term out for the first 10% of the steps (a
warm-up it adds for GSM8K's convergence); ``proximal_after=0.1`` does that, the default (0) applies the
term from the first step, as the method is described in the paper.
"""

from __future__ import annotations

import json
import random
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from pydantic import Field

from harness.api import (
    HarnessError,
    LoadedModel,
    PairSFTSettings,
    StageContext,
    Trained,
    TrainingRun,
    causal_lm_loss,
    collate_sft,
    cpu_pair_sizes,
    defences,
    encode_sft,
    fine_tune,
    intercept_training,
    pair_side,
    write_json,
)

ALIGNMENT_FILE = "lisa_alignment.json"
ALIGNMENT_FORMAT = "harness-lisa-alignment"


class LisaParams(PairSFTSettings):
    rho: float = Field(1.0, ge=0, description="proximal intensity rho (released: 1); 0 gives plain BSO")
    alignment_steps: int = Field(100, ge=1, description="K1: optimizer steps per alignment state (released: 100)")
    finetune_steps: int = Field(900, ge=1, description="K2: optimizer steps per user-data state (released: 900)")
    proximal_after: float = Field(0.0, ge=0, lt=1, description="fraction of the attack's steps before the "
                                                               "proximal term starts (released code: 0.1)")
    alignment_sft: bool = Field(True, description="run the alignment stage (SFT on refusals) in the defend stage")


# --- the schedule ---------------------------------------------------------------------------------


def state_at(step: int, alignment_steps: int, finetune_steps: int) -> str:
    """'alignment' for the first K1 steps of every K1 + K2, else 'finetune' (0-based optimizer steps)."""
    return "alignment" if step % (alignment_steps + finetune_steps) < alignment_steps else "finetune"


def proximal_term(parameters: list[torch.nn.Parameter], anchor: list[torch.Tensor], rho: float) -> torch.Tensor:
    """rho / 2 * sum_p ||p - anchor_p||^2, in float32."""
    return rho / 2 * sum((p.float() - a.float()).pow(2).sum() for p, a in zip(parameters, anchor))


class LisaSchedule:
    """The interceptor: for each ``train`` run it joins, alternates the states and adds the proximal term."""

    def __init__(self, params: LisaParams, alignment: list[dict[str, list[int]]], pad_id: int, seed: int) -> None:
        if not alignment:
            raise HarnessError("Lisa: no alignment records; the defend stage stored none.")
        self.params = params
        self.alignment = alignment
        self.pad_id = pad_id
        self.rng = random.Random(seed)
        self.order: list[int] = []
        self.runs: list[dict[str, Any]] = []  # per train() run it joined: its optimizer steps per state

    def _alignment_batch(self, size: int, device: torch.device) -> dict[str, torch.Tensor]:
        rows = []
        for _ in range(size):
            if not self.order:
                self.order = list(range(len(self.alignment)))
                self.rng.shuffle(self.order)
            rows.append(self.alignment[self.order.pop()])
        batch = collate_sft(rows, self.pad_id, self.params.mask_padding)
        return {k: v.to(device) for k, v in batch.items()}

    def __call__(self, run: TrainingRun, loss_fn: Any) -> Any:
        params = self.params
        stats = {"description": run.description, "alignment_steps": 0, "finetune_steps": 0}
        self.runs.append(stats)
        current: dict[str, Any] = {"step": None, "state": None, "anchor": None}

        def lisa_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Any:
            state = state_at(run.step, params.alignment_steps, params.finetune_steps)
            if current["step"] != run.step:  # first micro-batch of an optimizer step
                if state != current["state"] and params.rho > 0:  # a switch (or the start): the new anchor
                    current["anchor"] = [p.detach().clone() for p in run.parameters]
                current["step"], current["state"] = run.step, state
                stats[f"{state}_steps"] += 1
            if state == "alignment":
                output = causal_lm_loss(model, self._alignment_batch(len(batch["input_ids"]),
                                                                     batch["input_ids"].device))
            else:
                output = loss_fn(model, batch)
            loss, terms = output if isinstance(output, tuple) else (output, {})
            active = params.rho > 0 and run.step >= params.proximal_after * run.total_steps
            proximal = proximal_term(run.parameters, current["anchor"], params.rho) if active else loss.new_zeros(())
            return loss + proximal, {**terms, "proximal": proximal.detach(),
                                     "alignment_state": float(state == "alignment")}

        return lisa_loss


# --- the recipe -----------------------------------------------------------------------------------


def load_alignment(path: Path) -> dict[str, Any]:
    """The stored alignment records (JSON, never pickle), with the prompt format and seed of their run."""
    if not path.is_file():
        raise HarnessError(f"Lisa: {path} is missing. The defend stage writes it; clear that stage from the cache "
                           "and run again.")
    stored = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(stored, dict) or stored.get("format") != ALIGNMENT_FORMAT:
        raise HarnessError(f"Lisa: {path} is not a Lisa alignment file (format {ALIGNMENT_FORMAT!r}).")
    return stored


@contextmanager
def during_attack(model: LoadedModel, params: LisaParams, artefacts: Path) -> Iterator[None]:
    """Pipeline hook around the attack: every training loop inside runs Lisa's bi-state schedule."""
    stored = load_alignment(Path(artefacts) / ALIGNMENT_FILE)
    tokenizer: Any = model.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    examples = [encode_sft(tokenizer, r["prompt"], r["response"], stored["prompt_format"], params.max_length,
                           params.mask_prompt) for r in stored["records"]]
    schedule = LisaSchedule(params, examples, pad_id, seed=stored["seed"])
    with intercept_training(schedule):
        yield
    if not schedule.runs:
        raise HarnessError("Lisa: the attack ran no training loop of the harness (harness.api.train / fine_tune), "
                           "so the defence could not act. Lisa needs an attack that trains through them.")


# CPU: the shared pair size for the alignment stage; the paper's 1:9 split of K1 + K2 = 1000 steps scaled to
# the CPU attacks' 12-32 steps, so that they see alignment steps at all: one in every ten.
CPU = {**cpu_pair_sizes(lr=1e-4)["cpu"], "alignment_steps": 1, "finetune_steps": 9}


@defences.register("lisa", params=LisaParams, during_attack=during_attack, profiles={"cpu": CPU},
                   presets={"bso": {"rho": 0.0}},  # the paper's Bi-State Optimisation baseline (no proximal term)
                   description="Lisa: the attack's fine-tuning alternates with alignment steps, each state held "
                               "near its switching point by a proximal term (fine-tuning-API threat model)")
def lisa(model: LoadedModel, params: LisaParams, ctx: StageContext) -> Trained:
    """Alignment stage (SFT on refusals, unless ``alignment_sft`` is off); store the alignment records."""
    records = pair_side(ctx, params, "harmless")
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    write_json(ctx.workdir / ALIGNMENT_FILE, {
        "format": ALIGNMENT_FORMAT, "prompt_format": ctx.prompt_format, "seed": ctx.seed,
        "records": [{"prompt": r.prompt, "response": r.response} for r in records]})
    if not params.alignment_sft:
        return Trained(None, {"lisa_alignment_records": len(records)})
    report = fine_tune(model.model, model.tokenizer, records, params, ctx, "lisa: alignment")
    return Trained(model, {"lisa_alignment_records": len(records),
                           "lisa_alignment_training": {**report.summary(), "pairs": len(records)}})
