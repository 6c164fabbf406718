"""The judge contract: score (prompt, response) pairs with a probability of harm."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


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
