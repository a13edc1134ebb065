"""One run per run directory: an exclusive lock held for the run's lifetime.

The lock is an OS file lock (``filelock``, ``flock`` on POSIX) on ``<run dir>/run.lock``; the holder's
PID, host and start time are written beside it (``run.owner.json``) so that a second run can say who holds
it. The OS drops the lock when its process dies, so the directory of a killed run is free at once for
``resume=auto``; a leftover ``run.owner.json`` means nothing without the lock. Only rank 0 of a
multi-process run takes it (the other ranks run inside rank 0's lifetime).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from chameleon_ft.errors import RunError

LOCK_FILE = "run.lock"
OWNER_FILE = "run.owner.json"


class RunDirLock:
    """Exclusive lock on a run directory (a context manager); :meth:`acquire` fails at once when taken."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self._lock = None

    @property
    def owner_file(self) -> Path:
        return self.run_dir / OWNER_FILE

    def owner(self) -> dict:
        """The recorded holder (``pid``, ``host``, ``since``), or ``{}`` when none was recorded."""
        try:
            return json.loads(self.owner_file.read_text())
        except (OSError, ValueError):
            return {}

    def acquire(self) -> RunDirLock:
        """Take the lock (creating the directory), or raise :class:`RunError` naming the holder."""
        from filelock import FileLock, Timeout

        self.run_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.run_dir / LOCK_FILE), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            owner = self.owner()
            who = (f"PID {owner.get('pid', '?')} on host {owner.get('host', '?')}, since {owner.get('since', '?')}"
                   if owner else "a process that has not recorded itself yet")
            raise RunError(f"run directory {self.run_dir} is in use by another run ({who}); wait for it to "
                           f"finish, or choose another directory (hydra.run.dir=...)") from None
        self._lock = lock
        tmp = self.owner_file.with_name(OWNER_FILE + ".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                   "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
        os.replace(tmp, self.owner_file)
        return self

    def release(self) -> None:
        if self._lock is None:
            return
        self.owner_file.unlink(missing_ok=True)
        self._lock.release()
        self._lock = None

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
