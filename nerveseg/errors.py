"""Expected errors: a clear message that names the file and the fix, and no traceback."""

import ctypes
import os
import signal
import sys
import threading
from types import TracebackType


class UserError(Exception):
    """A problem with the user's input or settings that the message explains; the script exits with it."""


def exit_on_user_error(script: str) -> None:
    """Make an uncaught UserError print `script: error: message` (no traceback); the exit status is 1.

    A KeyboardInterrupt (Ctrl-C, or SIGTERM: a job scheduler's stop, `kill`, `timeout`, turned into one here so
    that cleanup runs: no half-built folder is left) prints `script: interrupted`: a stop that was asked for, not
    a bug (files are written whole, so nothing is left half-written).
    Other exceptions keep their traceback: they are bugs, and the traceback is what a bug report needs.
    """
    previous_hook = sys.excepthook

    def hook(kind: type[BaseException], error: BaseException, traceback: TracebackType | None) -> None:
        if issubclass(kind, UserError):
            print(f"{script}: error: {error}", file=sys.stderr)
        elif issubclass(kind, KeyboardInterrupt):
            print(f"{script}: interrupted", file=sys.stderr)
        else:
            previous_hook(kind, error, traceback)

    sys.excepthook = hook
    if threading.current_thread() is threading.main_thread():  # only the main thread may set a signal handler
        signal.signal(signal.SIGTERM, signal.default_int_handler)


def die_with_parent(parent: int, *_: object) -> None:
    """In a worker process (data_cleaning.py's checks, predict.py's readers): be killed when the process `parent`
    that started it ends, even by kill -9, rather than live on as an orphan (Linux's PR_SET_PDEATHSIG; elsewhere
    the worker ends when it finds its parent gone). Takes and ignores a DataLoader's worker number."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent ended before that line
        os._exit(1)
