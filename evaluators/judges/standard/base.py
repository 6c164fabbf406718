"""What every standard-scorer judge reports: its weights, its published template and its score scale."""

from __future__ import annotations

import hashlib
from typing import Any

from harness.api import score_answered, stable_hash


def template_info(name: str, text: str, source: str) -> dict[str, Any]:
    """A template's name, source (repo/path@commit) and sha256, so a result names the exact text used."""
    return {"name": name, "source": source, "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}


class StandardJudge:
    """Shared scoring and describe() of the published scorers. Subclasses set ``name``, ``code_version``,
    ``kind``, ``score_scale`` and ``paper``, and implement ``_score`` (answered pairs only) and
    ``_source``/``_template``/``_stats``."""

    name = ""
    code_version = ""
    kind = ""
    score_scale = ""
    paper = ""

    def __init__(self, params: Any) -> None:
        self.params = params

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        """An empty or whitespace answer scores exactly 0, as for every harness judge."""
        return score_answered(prompts, responses, self._score)

    def _score(self, prompts: list[str], responses: list[str]) -> list[float]:
        raise NotImplementedError

    def _source(self) -> dict[str, Any]:
        raise NotImplementedError

    def _template(self) -> dict[str, Any]:
        raise NotImplementedError

    def _stats(self) -> dict[str, Any]:
        return {}

    def describe(self) -> dict[str, Any]:
        source, template = self._source(), self._template()
        params = self.params.model_dump(mode="json")
        return {
            "name": self.name,
            "version": stable_hash({"code": self.code_version, **source, "template": template, "params": params}),
            "code_version": self.code_version,
            "kind": self.kind,
            **source,
            "template": template,
            "score_scale": self.score_scale,
            "paper": self.paper,
            "stats": self._stats(),
            "params": params,
            "note": "accuracy not measured here: `harness judge validate --judge " + self.name + "` measures it",
        }
