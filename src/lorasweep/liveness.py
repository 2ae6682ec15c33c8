"""Whether the process that wrote a record still runs: ``host:pid:start`` identities, so a pid reused by
another program after a crash is not mistaken for the original (the start time since boot differs)."""

from __future__ import annotations

import os
import socket
from pathlib import Path


def process_identity(pid: int | None = None) -> str:
    """``host:pid:start`` of ``pid`` (this process by default)."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{process_start(pid)}"


def process_start(pid: int) -> str:
    try:  # field 22 of /proc/<pid>/stat: start time since boot; a reused pid has another one
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "?"


def is_alive(identity: str) -> bool:
    """False only when ``identity`` names a process on this host that no longer runs (or a zombie)."""
    host, _, rest = identity.partition(":")
    pid_text, _, start = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return True  # another machine: cannot tell, so assume it runs
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    except (OSError, IndexError):
        pass
    return start in ("?", process_start(pid))
