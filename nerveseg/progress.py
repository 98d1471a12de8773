"""Progress of long work: a tqdm bar in a terminal, and elsewhere (a log file, CI, a notebook) a line at least
every LINE_EVERY seconds, so that a run whose output is not a terminal never looks hung."""

import sys
import time
from collections.abc import Iterable, Iterator

from tqdm import tqdm

LINE_EVERY = 30.0  # seconds between two progress lines where the output is not a terminal


class ProgressLines:
    """Iterates `items`, printing "DESC: batch n of total, s s" to stderr whenever LINE_EVERY seconds have passed
    since the last line (or the start); tqdm's set_postfix adds its values to the line."""

    def __init__(self, items: Iterable, *, desc: str, unit: str, total: int | None = None) -> None:
        self.items, self.desc, self.unit, self.postfix = items, desc, unit, ""
        self.total = len(items) if total is None and hasattr(items, "__len__") else total

    def __iter__(self) -> Iterator:
        total = f" of {self.total}" if self.total is not None else ""
        started = last = time.monotonic()
        for count, item in enumerate(self.items, start=1):
            yield item
            now = time.monotonic()
            if now - last >= LINE_EVERY:
                print(f"{self.desc}: {self.unit} {count}{total}, {now - started:.0f} s{self.postfix}", file=sys.stderr,
                      flush=True)
                last = now

    def set_postfix(self, **values: object) -> None:
        """Values shown at the end of the next lines (as tqdm's bar shows them)."""
        self.postfix = "".join(f", {name} {value}" for name, value in values.items())


def progress(items: Iterable, *, desc: str, unit: str = "batch", total: int | None = None,
             quiet: bool = False) -> "tqdm | ProgressLines":
    """`items` (`total` of them, where they have no length) with their progress shown: nothing when `quiet`, a tqdm
    bar (that goes when done) in a terminal, else a line at least every LINE_EVERY seconds."""
    if quiet or sys.stderr.isatty():
        return tqdm(items, desc=desc, unit=unit, total=total, leave=False, disable=quiet)
    return ProgressLines(items, desc=desc, unit=unit, total=total)
