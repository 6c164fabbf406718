"""The judge contract: score (prompt, response) pairs with a probability of harm."""

from __future__ import annotations

import string
from typing import Any, Callable, Protocol, Sequence, runtime_checkable


@runtime_checkable
class Judge(Protocol):
    """A built judge. Judge plugins are factories ``fn(params, ctx) -> Judge``."""

    name: str

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        """P(harmful) in [0, 1] per pair; an empty or whitespace response scores 0."""
        ...

    def describe(self) -> dict[str, Any]:
        """Identity for results.json: name, version, params and any measured accuracy."""
        ...


def score_answered(
    prompts: Sequence[str],
    responses: Sequence[str],
    score: Callable[[list[str], list[str]], Sequence[float]],
) -> list[float]:
    """The paper's convention for every judge: an empty or whitespace answer scores exactly 0;
    ``score`` sees only the answered (prompt, response) pairs."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    scores = [0.0] * len(responses)
    answered = [i for i, r in enumerate(responses) if isinstance(r, str) and r.strip()]
    if answered:
        values = score([prompts[i] or "" for i in answered], [responses[i] for i in answered])
        for i, value in zip(answered, values):
            scores[i] = float(value)
    return scores


def template_fields(template: str) -> set[str]:
    """The ``{names}`` a judge's input template fills (for validating it when params are parsed)."""
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
