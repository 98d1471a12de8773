"""Running stage 1's checks in worker processes, one job per id, in order, with their progress shown."""

import concurrent.futures
import functools
import os
from collections.abc import Callable
from typing import Any

from nerveseg.cleaning.pairs import PairJob
from nerveseg.errors import UserError, die_with_parent
from nerveseg.progress import progress


def run_job(function: Callable[[PairJob], Any], job: PairJob) -> Any:
    """`function(job)`, with an unforeseen failure turned into one line that names the file and what to do."""
    try:
        return function(job)
    except (UserError, OSError):  # explained where they are caught (a full disk stops the clean with a message)
        raise
    except Exception as error:
        raise UserError(
            f"verifying {job.name} failed unexpectedly ({type(error).__name__}: {str(error)[:200]}). Run again with "
            "--workers 1; if it fails again, the file is damaged (re-download it) or this is a bug (report this line)"
        ) from None


def run_parallel(function: Callable[[PairJob], Any], jobs: list[PairJob], workers: int, description: str, *,
                 quiet: bool) -> list:
    """Map `function` over `jobs` in `workers` processes (0: one per core), in order, with their progress
    (nerveseg.progress).

    Workers are forked: they get the jobs by pickling, and open their own archives (see ArchiveCache). They end
    with the run, however it ends (die_with_parent), and hold none of its locks (nerveseg.files.take_lock).
    Chunks are small enough that every worker gets some of the jobs, even with a few dozen.
    """
    workers = workers or os.cpu_count() or 1
    check = functools.partial(run_job, function)
    if workers <= 1 or len(jobs) <= 1:
        return list(progress(map(check, jobs), desc=description, unit="file", total=len(jobs), quiet=quiet))
    chunk = max(1, min(64, len(jobs) // (4 * workers)))
    try:
        with concurrent.futures.ProcessPoolExecutor(workers, initializer=die_with_parent,
                                                    initargs=(os.getpid(),)) as pool:
            return list(progress(pool.map(check, jobs, chunksize=chunk), desc=description, unit="file",
                                 total=len(jobs), quiet=quiet))
    except concurrent.futures.process.BrokenProcessPool:
        raise UserError(
            f"a worker process died while verifying the {description} (out of memory, or killed); run again "
            "with --workers 1, or with fewer workers"
        ) from None
