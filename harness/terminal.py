"""One way to put user-supplied text on the terminal: escaped, so Rich never reads it as markup.

Rich treats ``[bold]…[/]`` in printed strings as markup, so a defence named ``[/]`` or an error
message quoting ``jbb-pairs[Privacy]`` would crash the print or lose text. Every message that
can carry a name, a path, a value or an exception from the user goes through :func:`plain`
(or :func:`print_error`), never straight into an f-string passed to ``console.print``.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape

# Set by `harness --debug`: every command then shows tracebacks instead of one-paragraph errors.
state = {"debug": False}


def plain(value: Any) -> str:
    """``str(value)`` with Rich markup escaped: shown exactly as written."""
    return escape(str(value))


def print_error(console: Console, error: BaseException | str) -> None:
    """The CLI's one-paragraph error line: a red label, then the message as plain text."""
    console.print(f"[bold red]Error:[/] {plain(error)}")
