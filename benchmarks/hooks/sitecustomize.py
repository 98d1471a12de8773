"""Put this folder on PYTHONPATH to kill predict.py (SIGKILL: no clean-up of any kind) as it is about to keep its
chunk number KILL_AT (1-based), in the process of rank KILL_RANK (default 0); Python's audit hook sees the rename
before it happens. Without KILL_AT it does nothing. Used by benchmarks/predict_processes.py and
tests/test_predict_chunks.py."""

import os
import signal
import sys

if os.environ.get("KILL_AT") and os.environ.get("RANK", "0") == os.environ.get("KILL_RANK", "0"):
    commits = []

    def kill_at_commit(event: str, args: tuple) -> None:
        if event == "os.rename" and os.path.basename(str(args[1])).startswith("chunk-"):
            commits.append(args[1])
            if len(commits) == int(os.environ["KILL_AT"]):
                os.kill(os.getpid(), signal.SIGKILL)

    sys.addaudithook(kill_at_commit)
