"""What a plugin receives besides its params: seed, device, data access, progress, scratch space."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console


@dataclass
class StageContext:
    """Shared plumbing handed to every defence, attack and evaluator.

    ``data`` resolves dataset names (already excluding evaluation prompts from training sets);
    ``workdir`` is scratch space that is discarded unless the stage completes; ``stats``
    collects compute figures (tokens, steps, wall time) that go into results.json.
    """

    seed: int
    device: str
    dtype: str
    data: Any  # harness.data.readers.DataAccess
    cache_dir: Path
    workdir: Path
    console: Console = field(default_factory=lambda: Console(stderr=True))
    stats: dict[str, Any] = field(default_factory=dict)
    prompt_format: str = "chat"
    base_model: str | None = None  # the run's base model reference (e.g. for reference perplexities)
    # A backdoor trigger the attack planted (harness.data.triggers.Trigger): post-attack evaluations that generate
    # from prompts also score prompts carrying it. None everywhere else.
    trigger: Any = None

    def add_stat(self, name: str, value: float) -> None:
        self.stats[name] = self.stats.get(name, 0) + value
