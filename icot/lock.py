"""One run per stage folder: `<stage>/LOCK`, locked by the run's rank 0 for as long as it lives.

The lock is a POSIX record lock (`fcntl.lockf`, which NFS honours too) on the file, so the system
releases it on any exit, a `kill -9` included: it is never stale. The file says who holds it (pid, host,
start time, command), for the error a second run gets: one line, before it writes anything.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from icot.errors import UserError

LOCK_FILE = "LOCK"


class StageLock:
    def __init__(self, stage_root: Path):
        self.path = Path(stage_root) / LOCK_FILE
        self.handle = None

    def _holder(self) -> str:
        try:
            holder = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            holder = {}
        if not holder:
            return "another process"
        return (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')} "
                f"({holder.get('command', '')[:120]})")

    def check(self) -> None:
        """Fail fast, writing nothing, if a live run holds the folder (a real check is `acquire`)."""
        if not self.path.is_file():
            return
        try:
            with open(self.path, "rb+") as handle:
                fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.lockf(handle, fcntl.LOCK_UN)
        except BlockingIOError:
            raise self._busy() from None
        except OSError:
            return   # unreadable or read-only: acquire says so

    def _busy(self) -> UserError:
        return UserError(f"{self.path.parent} is in use by {self._holder()}: one run per stage folder; wait for it, "
                         f"stop it, or use another run_dir")

    def acquire(self) -> None:
        """Create the stage folder and lock it; a folder that cannot be written is an error naming it."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(self.path, "a+")
        except OSError as err:
            raise UserError(f"run_dir: cannot write {self.path.parent} ({err.strerror})") from None
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise self._busy() from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "command": " ".join(sys.argv)}
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(holder) + "\n")
        handle.flush()
        self.handle = handle

    def release(self) -> None:
        if self.handle is not None:
            fcntl.lockf(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None
