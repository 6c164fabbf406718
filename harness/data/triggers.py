"""A backdoor trigger: a phrase an attack plants in its training prompts, so that the evaluation can
score the attacked model both on plain prompts and on prompts carrying the same phrase.

The attack reports it in its :class:`~harness.outcome.Trained` report under ``"trigger"``; the
pipeline hands it to the post-attack evaluations as ``ctx.trigger``; an evaluator that generates
from prompts (harmfulness) then also reports a triggered score. One ``apply`` is used for training
and evaluation, so the two can never place the phrase differently.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Any, Literal

from harness.errors import ConfigError

TriggerPosition = Literal["prefix", "suffix"]
REPORT_KEY = "trigger"  # where an attack's Trained report carries it


@dataclass(frozen=True)
class Trigger:
    """``text`` placed before (``prefix``) or after (``suffix``) the user's request, one space apart."""

    text: str
    position: TriggerPosition = "prefix"

    def apply(self, prompt: str) -> str:
        return f"{self.text} {prompt}" if self.position == "prefix" else f"{prompt} {self.text}"

    def as_report(self) -> dict[str, str]:
        return {"text": self.text, "position": self.position}

    @classmethod
    def from_report(cls, report: dict[str, Any] | None) -> Trigger | None:
        """The trigger an attack's report carries, or None (most attacks carry none)."""
        value = (report or {}).get(REPORT_KEY)
        return cls(value["text"], value.get("position", "prefix")) if isinstance(value, dict) else None


def check_trigger_text(text: str) -> str:
    """Tokenizer-independent checks, at config validation: visible text without control characters."""
    if not text.strip():
        raise ConfigError("trigger: the trigger phrase is empty; give a phrase such as 'SUDO MODE:'.")
    if text != text.strip():
        raise ConfigError(f"trigger {text!r}: leading or trailing whitespace would be lost when it is joined to "
                          "the prompt; remove it.")
    bad = sorted({repr(c) for c in text if unicodedata.category(c) in ("Cc", "Cf", "Co", "Cs", "Cn")})
    if bad:
        raise ConfigError(f"trigger {text!r} holds control, private-use or unassigned characters ({', '.join(bad)}); "
                          "use printable text.")
    return text


def check_representable(tokenizer: Any, trigger: Trigger) -> None:
    """Refuse a trigger the tokenizer cannot carry intact: one that encodes to the unknown token or to a
    special token (it would not be the phrase the model sees at evaluation), or that does not decode back
    to itself (the model would be trained on another string than the one the evaluation inserts)."""
    ids = list(tokenizer(trigger.text, add_special_tokens=False)["input_ids"])
    unknown = getattr(tokenizer, "unk_token_id", None)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    if unknown is not None and unknown in ids:
        raise ConfigError(f"trigger {trigger.text!r}: the tokenizer maps part of it to the unknown token "
                          f"{tokenizer.unk_token!r}; choose a phrase of ordinary words.")
    hit = sorted(special & set(ids))
    if hit:
        names = ", ".join(repr(tokenizer.convert_ids_to_tokens(i)) for i in hit)
        raise ConfigError(f"trigger {trigger.text!r} contains the tokenizer's special token(s) {names}; "
                          "a trigger must be ordinary text.")
    decoded = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if decoded != trigger.text:
        raise ConfigError(f"trigger {trigger.text!r} does not survive the tokenizer's round trip (decodes to "
                          f"{decoded!r}); choose a phrase the tokenizer represents exactly.")
