"""The error a family raises for a prompt it cannot take, and how such messages quote the user's value.

Families raise `PromptError` (unknown class, empty or too long text); the HTTP layer turns it into an
OpenAI-style 400 naming `param` and `code`. `quote` lives here, below both, because families quote the
prompt in their messages and the HTTP layer quotes request values the same way: an error message must never
echo a 50 MiB prompt back.
"""

from __future__ import annotations

from typing import Any

QUOTE_CHARS = 40


def quote(value: Any, limit: int = QUOTE_CHARS) -> str:
    """`repr(value)`, cut to a short prefix: an error message must not echo a 50 MiB prompt back."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} characters)"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class PromptError(ValueError):
    """A prompt the model cannot take (unknown class, empty text, too long); `code` names why."""

    def __init__(self, message: str, code: str = "invalid_prompt", param: str = "prompt") -> None:
        super().__init__(message)
        self.code = code
        self.param = param
