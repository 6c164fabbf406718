"""LoRA harmful fine-tuning: the fine-tuning-API threat model (Vaccine/Booster line of work).

The adapter is saved on its own (servable by vLLM as a LoRARequest); ``merge`` folds it into
the weights instead. Searchable: the rank, the target modules (a list, or one of the named sets
``attention``, ``mlp``, ``all``), the optimiser and schedule, and the prompt format trained in.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from attacks.variations import AttackVariations, format_report, training_context
from harness.api import LoadedModel, SFTParams, StageContext, Trained, attacks, fine_tune

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
# Named target sets (Llama module names), expanded to the list before validation: a set and the same
# list spelled out are one configuration and one cache key.
TARGET_SETS = {"attention": ATTENTION, "mlp": MLP, "all": ATTENTION + MLP}


class LoRAParams(SFTParams, AttackVariations):
    lr: float = Field(1e-4, gt=0, description="peak learning rate (LoRA needs more than full fine-tuning)")
    optimizer: Literal["adam", "adamw", "sgd"] = "adamw"
    rank: int = Field(8, ge=1, description="LoRA rank r")
    alpha: float = Field(16, gt=0, description="LoRA scaling alpha")
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: list[str] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="module names that get adapters, or a named set: attention, mlp, all",
        min_length=1,
    )
    merge: bool = Field(False, description="merge the adapter into the weights after training")

    @field_validator("targets", mode="before")
    @classmethod
    def _named_set(cls, value: object) -> object:
        if isinstance(value, str):
            if value not in TARGET_SETS:
                raise ValueError(f"unknown target set {value!r}; use a list of module names or one of "
                                 f"{', '.join(TARGET_SETS)}")
            return list(TARGET_SETS[value])
        return value


@attacks.register("lora", params=LoRAParams, threat_model="fine-tuning-api",
                  profiles={"cpu": {"num_samples": 48, "max_length": 128, "batch_size": 4},
                            "paper": {"num_samples": 1000, "max_length": 256, "batch_size": 4}},
                  presets={"cpu-1e-4-48": {"lr": 1e-4, "num_samples": 48, "dataset": "beavertails-unsafe"},
                           "cpu-1e-4-128": {"lr": 1e-4, "num_samples": 128, "dataset": "beavertails-unsafe"},
                           # rank and target-set variations of the strong cell (fine-tuning-API attacker)
                           "cpu-r32-all-3e-4-128": {"lr": 3e-4, "rank": 32, "alpha": 64, "targets": "all",
                                                    "num_samples": 128, "dataset": "beavertails-unsafe"},
                           "cpu-r8-attention-3e-4-128": {"lr": 3e-4, "targets": "attention", "num_samples": 128,
                                                         "dataset": "beavertails-unsafe"},
                           "cpu-r8-mlp-3e-4-128": {"lr": 3e-4, "targets": "mlp", "num_samples": 128,
                                                   "dataset": "beavertails-unsafe"}},
                  description="LoRA SFT on harmful QA (fine-tuning-API threat model)")
def lora(model: LoadedModel, params: LoRAParams, ctx: StageContext) -> Trained:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=params.rank, lora_alpha=params.alpha, lora_dropout=params.dropout,
        target_modules=list(params.targets), task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model.model, config)
    records = ctx.data.qa(params.dataset, n=params.num_samples)
    report = fine_tune(peft_model, model.tokenizer, records, params, training_context(ctx, params), "attack: lora")
    model.model = peft_model.merge_and_unload() if params.merge else peft_model
    return Trained(model, {"attack_training": report.summary(), **format_report(ctx, params)})
