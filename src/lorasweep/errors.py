"""The one exception type for mistakes a user can fix.

Everything else that escapes is a bug and keeps its traceback; a ``UserError`` is turned by the CLI into
one paragraph on stderr and exit code 2.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: names the config key or file at fault, what is wrong, and what to do about it."""

    def __init__(self, where: str, problem: str, hint: str = "") -> None:
        self.where = where
        self.problem = problem
        self.hint = hint
        super().__init__(self.paragraph())

    def __reduce__(self) -> tuple[type[UserError], tuple[str, str, str]]:
        """Pickle by fields: a trial's error travels from its worker process back to the sweep controller."""
        return (UserError, (self.where, self.problem, self.hint))

    def paragraph(self) -> str:
        text = f"{self.where}: {self.problem}"
        if self.hint:
            text += f" {self.hint}"
        return text
