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


#: errno values of a file system that cannot take a write: full, over quota, read-only, refused, failing.
STORAGE_ERRNOS = frozenset({28, 122, 30, 13, 1, 5})  # ENOSPC, EDQUOT, EROFS, EACCES, EPERM, EIO


def storage_error(path: object, exc: OSError) -> UserError | None:
    """A ``UserError`` for a write the file system refused (``None`` for other ``OSError``s, which are bugs):
    nothing was replaced, so the earlier files are intact and the run can continue from its last state."""
    if exc.errno not in STORAGE_ERRNOS:
        return None
    return UserError(str(path), f"could not be written: {exc.strerror or exc}. Nothing was replaced: the LoRA "
                     "files and training states saved before are intact.",
                     "Free space on that disk (or make it writable, or point output.root elsewhere) and continue "
                     "with `lorasweep resume <run folder>` if it saved states (output.save_state=true).")
