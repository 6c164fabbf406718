"""What a defence or an attack hands back to the pipeline: the model it changed and what it reports.

Reports go to results.json (the stage's ``info``): a training summary, a loss history, the seed of
a re-initialisation. Returning them, rather than writing them onto the model object, keeps the
model a model and makes a recipe's output explicit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from harness.models.loading import LoadedModel


@dataclass
class Trained:
    """``model``: the model whose weights the recipe changed, or None when they are unchanged (the
    stage then points at its parent, e.g. a defence that only leaves an artefact in its workdir);
    ``report``: JSON-able facts for results.json."""

    model: LoadedModel | None
    report: dict[str, Any] = field(default_factory=dict)


def as_trained(result: Any) -> Trained:
    """A recipe's return value as :class:`Trained`; a bare model (or None) reports nothing."""
    if isinstance(result, Trained):
        return result
    if result is None or isinstance(result, LoadedModel):
        return Trained(result)
    raise TypeError(f"A defence or attack must return harness.outcome.Trained, a LoadedModel or None, "
                    f"not {type(result).__name__}.")
