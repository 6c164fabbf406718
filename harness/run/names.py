"""Names that become paths, file names and table cells: one rule for runs, archives and plugins.

A run name is a directory under ``output_dir`` and a member name in a submission archive, so the
rule is the archive's: one plain path part, ASCII letters, digits and ``._@+=-``, not starting
with a dot or a symbol. Checking it when the config is built means a name that `harness submit`
would refuse never costs a trained model, and a name can never point outside ``output_dir``.
"""

from __future__ import annotations

import re

from harness.errors import ConfigError

SAFE_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._@+=-]{0,199}$")  # one path part (runs, archive members)
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")  # defence, attack and preset names


def check_run_name(name: str) -> str:
    """``name`` if it is one safe path part; else a ConfigError that says what is allowed."""
    if not SAFE_PART.match(name) or name in (".", ".."):
        raise ConfigError(f"run_name {name!r} is not allowed: use one plain name of ASCII letters, digits and "
                          "._@+=- (at most 200 characters, no '/' or '..', not starting with '.'), e.g. "
                          "run_name=repnoise-lr4e-5.")
    return name


def safe_part(text: str, fallback: str = "x") -> str:
    """``text`` made into a safe path part: other characters become '-' (for default run names)."""
    cleaned = re.sub(r"[^A-Za-z0-9._@+=-]+", "-", text).strip("-.")[:200]
    cleaned = cleaned.lstrip("@+=")
    return cleaned or fallback
