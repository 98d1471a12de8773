"""Running stage 1's checks in worker processes, one job per file, with a bar."""

import concurrent.futures
import functools
from collections.abc import Callable
from typing import Any

from tqdm import tqdm

from nerveseg.errors import UserError
from nerveseg.kaggle_checks import _cache


def run_job(function: Callable, job: tuple, name: str) -> Any:
    """`function(job)`, with an unforeseen failure turned into one line that names the file and what to do."""
    try:
        return function(job)
    except (UserError, OSError):  # explained where they are caught (a full disk stops the clean with a message)
        raise
    except Exception as error:
        raise UserError(
            f"verifying {name} failed unexpectedly ({type(error).__name__}: {str(error)[:200]}). Run again with "
            "--workers 1; if it fails again, the file is damaged (re-download it) or this is a bug (report this line)"
        ) from None


def run_parallel(function: Callable, jobs: list, names: list[str], workers: int, description: str, *,
                 quiet: bool) -> list:
    """Map `function` over `jobs` (each about the file in `names`) in worker processes, in order, with a bar.

    Workers are forked: they get the jobs by pickling, and open their own archives (see ArchiveCache).
    Chunks are small enough that every worker gets some of the jobs, even with a few dozen.
    """
    bar = tqdm(total=len(jobs), desc=description, unit="file", disable=quiet or None, leave=False)
    results = []
    if workers <= 1 or len(jobs) <= 1:
        for job, name in zip(jobs, names, strict=True):
            results.append(run_job(function, job, name))
            bar.update()
        _cache.close()
    else:
        chunk = max(1, min(64, len(jobs) // (4 * workers)))
        try:
            with concurrent.futures.ProcessPoolExecutor(workers) as pool:
                for result in pool.map(functools.partial(run_job, function), jobs, names, chunksize=chunk):
                    results.append(result)
                    bar.update()
        except concurrent.futures.process.BrokenProcessPool:
            raise UserError(
                f"a worker process died while verifying the {description} (out of memory, or killed); run again "
                "with --workers 1, or with fewer workers"
            ) from None
    bar.close()
    return results
