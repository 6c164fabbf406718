"""The contract between evaluators and the pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class EvalResult:
    """Metrics (JSON-able numbers, nested by name) and per-item records (one JSONL line each).

    ``info`` carries provenance the leaderboard needs (judge identity and accuracy, generation settings).
    """

    metrics: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
