"""One run writes a run folder at a time: an exclusive lock on `<run folder>/.lock` while a run is in it.

Two runs started into the same `run.out_dir` would append to one metrics.jsonl and rename each other's
temporary checkpoint files. The lock is an OS advisory lock (`fcntl.flock`), so it goes away with the process
that held it, also after a crash or a kill: a stale lock file never blocks the next run. Where `fcntl` does
not exist (Windows) runs are not locked.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType

from flash_experts.errors import UserError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

LOCK_FILE = ".lock"


class RunFolderLock:
    """`with RunFolderLock(run_dir):` holds the folder for this process; a second holder gets a UserError."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self._file = None
        self._created_folder = False

    def __enter__(self) -> "RunFolderLock":
        self._created_folder = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / LOCK_FILE
        self._file = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held open for the lock's lifetime
        if fcntl is not None:
            try:
                fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._file.seek(0)
                holder = self._file.read().strip() or "unknown"
                self._file.close()
                self._file = None
                raise UserError(f"{self.run_dir} is in use by another run (process {holder}): wait for it to end, "
                                "or give this run another run.out_dir") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"{os.getpid()}\n")
        self._file.flush()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self._file is None:
            return
        self._file.close()  # closing releases the flock
        self._file = None
        # A run that failed before writing anything leaves no folder behind (a later run, or the demo's
        # "already holds a run" check, must not mistake it for saved work).
        if self._created_folder and [p.name for p in self.run_dir.iterdir()] == [LOCK_FILE]:
            (self.run_dir / LOCK_FILE).unlink(missing_ok=True)
            self.run_dir.rmdir()
