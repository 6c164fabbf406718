"""What a probe is configured by. Every field is part of the probe's cache key."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, SerializerFunctionWrapHandler, ValidationError, field_validator, model_serializer

from harness.errors import ConfigError
from harness.registry import Params, format_validation_error


class ProbeParams(Params):
    """Sizes and choices of ``harness probe`` (CPU-sized defaults; raise them on a GPU)."""

    num_prompts: int = Field(64, ge=2, description="harmful and as many harmless prompts for the linear probes")
    prompts: Literal["refusal-direction", "xstest"] = Field(
        "refusal-direction",
        description="probe prompts: the refusal-direction splits (harmful behaviours vs Alpaca instructions, "
                    "which differ in wording too), or xstest (XSTest's unsafe prompts vs its safe ones that "
                    "read like them: 'kill a Python process'; harder, at most 200 per class)",
    )
    lens_pairs: str = Field("decodingtrust-pairs",
                            description="pairs data set (prompt, harmful, harmless) for the logit lens and MMD")
    num_pairs: int = Field(32, ge=1, description="pairs drawn (seeded) for the logit lens and MMD to noise")
    seeds: int = Field(5, ge=1, le=100, description="train/test splits (and noise draws), one per seed")
    test_fraction: float = Field(0.3, gt=0, lt=1, description="share of prompts held out to score each probe")
    max_length: int = Field(128, ge=8, description="tokens per text (prompt + answer), truncated")
    batch_size: int = Field(8, ge=1, description="texts per forward; also the B of each MMD estimate, as in the loss")
    layers: list[int] | None = Field(None, description="hidden-state indices to report (0 = embeddings); None: all")

    @field_validator("layers")
    @classmethod
    def _distinct(cls, value: list[int] | None) -> list[int] | None:
        if value is not None:
            if not value:
                raise ValueError("name at least one layer, or leave it out for all")
            if len(set(value)) != len(value):
                raise ValueError("layer indices repeat")
            value = sorted(value)
        return value

    @model_serializer(mode="wrap")
    def _omit_default_prompts(self, handler: SerializerFunctionWrapHandler) -> Any:
        """The default prompt set is left out of dumps, so probe stage keys made before the choice existed
        stay valid."""
        data = handler(self)
        if isinstance(data, dict) and data.get("prompts") == "refusal-direction":
            del data["prompts"]
        return data


def parse_probe_params(values: dict[str, Any]) -> ProbeParams:
    """Validated params; a bad value is a ConfigError naming ``probe.<field>``."""
    try:
        return ProbeParams.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, "probe")) from None
