"""The three shapes of data the harness trains and evaluates on."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QA:
    """A prompt and an answer (harmful QA for attacks, task data for harmless fine-tuning)."""

    prompt: str
    response: str
    category: str | None = None
    source: str = ""


@dataclass(frozen=True)
class Pair:
    """One RepNoise item: the same prompt with a harmful and a harmless (refusal) answer."""

    prompt: str
    harmful: str
    harmless: str
    category: str | None = None
    source: str = ""


@dataclass(frozen=True)
class Prompt:
    """An evaluation prompt."""

    prompt: str
    category: str | None = None
    source: str = ""


def normalise_prompt(text: str) -> str:
    """Key for de-duplication and disjointness: case, whitespace and trailing punctuation ignored."""
    return " ".join(text.lower().split()).rstrip(" ?.!")
