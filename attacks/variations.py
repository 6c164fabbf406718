"""Searchable variations shared by the SFT attack recipes: the prompt format the attacker trains in.

Qi et al. 2024 ("On Evaluating the Durability of Safeguards for Open-Weight LLMs") show defences that
hold under one recipe breaking under small changes, among them the chat template; so an attack may
train in another format than the one the run evaluates in (``prompt_format``).

A field added here after results were cached must not change the cache key of an attack that leaves
it at its default: such fields are left out of the params dump (which the stage key hashes) while
they are None (pydantic's ``exclude_if``, per field, so it composes with any model serializer of the
settings classes), and a ``full-ft`` or ``lora`` run configured as before keeps its key and results.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import Field

from harness.api import Params, StageContext


class AttackVariations(Params):
    prompt_format: Literal["chat", "question-answer"] | None = Field(
        None, exclude_if=lambda value: value is None,  # not in the dump (nor the stage key) while None
        description="train in this prompt format instead of the run's (data.prompt_format); None: the run's")


def training_context(ctx: StageContext, params: AttackVariations) -> StageContext:
    """``ctx`` with the attack's own prompt format, if it sets one; stats still go to the stage's dict."""
    if params.prompt_format is None or params.prompt_format == ctx.prompt_format:
        return ctx
    return dataclasses.replace(ctx, prompt_format=params.prompt_format)


def format_report(ctx: StageContext, params: AttackVariations) -> dict[str, Any]:
    """The format the attack trained in, for results.json, only when it differs from the run's."""
    if params.prompt_format is None or params.prompt_format == ctx.prompt_format:
        return {}
    return {"trained_prompt_format": params.prompt_format}
