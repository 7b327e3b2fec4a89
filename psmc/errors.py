"""One exception type for every problem a user's `.psm` file can have.

Each error carries a location so the message can show the offending line with a caret, in the
style of a compiler: ``file:line:col: error: what`` / source line / caret / ``hint: how to fix``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Source:
    """A `.psm` text and the name it is reported under."""

    path: str
    text: str = field(repr=False)

    def line(self, lineno: int) -> str:
        lines = self.text.splitlines()
        if 1 <= lineno <= len(lines):
            return lines[lineno - 1]
        return ""


@dataclass(frozen=True)
class Loc:
    """A position in a source: 1-based line and column."""

    source: Source
    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.source.path}:{self.line}:{self.column}"

    __repr__ = __str__


class PsmError(Exception):
    """A problem with a `.psm` program, reported with its location and a fix."""

    def __init__(self, message: str, loc: Loc | None = None, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.loc = loc
        self.hint = hint

    def render(self) -> str:
        """The full compiler-style message: location, source line, caret, hint."""
        head = f"{self.loc}: error: {self.message}" if self.loc else f"error: {self.message}"
        parts = [head]
        if self.loc is not None:
            text = self.loc.source.line(self.loc.line).expandtabs(1)
            if text:
                gutter = f"{self.loc.line:>4} | "
                parts.append(gutter + text)
                parts.append(" " * (len(gutter) + max(self.loc.column - 1, 0)) + "^")
        if self.hint:
            parts.append(f"hint: {self.hint}")
        return "\n".join(parts)

    def __str__(self) -> str:
        return self.render()


from .standalone import PsmCallError  # noqa: E402  (one class for the runtime and psmc)
