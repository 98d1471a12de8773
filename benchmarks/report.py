"""Reporting the benchmarks: the rows of the table, the machine they ran on, and whether it was busy."""

import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import monai
import psutil
import torch

from nerveseg.files import atomic_write, write_csv

STARTED = time.perf_counter()
GB = 1e9
COLUMNS = ["key", "benchmark", "value", "unit", "goal", "met", "note"]


# %% Results
@dataclass
class Row:
    """One line of the results table. met is None where no goal applies at this size."""

    section: int  # the table is sorted by it: 1 cleaning, 2-4 training, 5 prediction, 6 memory, 7 scaling, 8 GPU
    key: str
    benchmark: str
    value: float
    unit: str
    goal: str = ""
    met: bool | None = None
    note: str = ""


def shown(value: float) -> str:
    """A figure with three significant digits, and thousands separated."""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def spread(samples: list[float], unit: str) -> str:
    """How a median was taken, for the note column."""
    if len(samples) == 1:
        return f"1 timed repetition ({shown(samples[0])} {unit})"
    return f"median of {len(samples)} ({shown(min(samples))}-{shown(max(samples))} {unit})"


def markdown(header: list[str], rows: list[Row]) -> str:
    """The machine lines and the table, as Markdown."""
    lines = [
        *(f"- {line}" for line in header),
        "",
        "| Benchmark | Value | Unit | Goal | Met | Note |",
        "| --- | ---: | --- | --- | --- | --- |",
    ]
    for row in rows:
        met = {True: "yes", False: "**no**", None: ""}[row.met]
        lines.append(f"| {row.benchmark} | {shown(row.value)} | {row.unit} | {row.goal} | {met} | {row.note} |")
    return "\n".join(lines) + "\n"


def write_results(out: Path, header: list[str], rows: list[Row]) -> str:
    """Write results.md and results.csv into `out`; return the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    text = "# Benchmark results\n\n" + markdown(header, rows)
    with atomic_write(out / "results.md") as file:
        file.write(text)
    write_csv(
        out / "results.csv",
        [
            {name: getattr(row, name) for name in COLUMNS}
            | {"value": f"{row.value:.6g}", "met": {True: "yes", False: "no", None: ""}[row.met]}
            for row in rows
        ],
        COLUMNS,
    )
    return text


def say(message: str) -> None:
    """A progress line, with the time since the start."""
    print(f"[{time.perf_counter() - STARTED:4.0f} s] {message}", flush=True)


# %% The machine
def cpu_model() -> str:
    """The CPU's marketing name, from /proc/cpuinfo where there is one."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_lines(device: torch.device, mode: str) -> list[str]:
    """What the figures were measured on, and the load at the start (other work slows everything down)."""
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
    else:
        gpu = "none used (--device cpu)" if torch.cuda.is_available() else "none; GPU rows are left out"
    return [
        f"mode: {mode}, device {device}, {time.strftime('%Y-%m-%d %H:%M')}",
        f"CPU: {cpu_model()}, {os.cpu_count()} logical cores, {psutil.virtual_memory().total / GB:.0f} GiB memory",
        f"GPU: {gpu}",
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), MONAI {monai.__version__}, "
        f"Python {platform.python_version()}",
        f"load average (1 min) at the start: {os.getloadavg()[0]:.2f}",
    ]


def cpu_seconds() -> tuple[float, float]:
    """CPU seconds used so far by the whole machine (time the hypervisor gave to other machines included), and
    by this process and its finished children."""
    times = psutil.cpu_times()
    busy = (
        times.user + times.nice + times.system + sum(getattr(times, name, 0.0) for name in ("irq", "softirq", "steal"))
    )
    return busy, sum(os.times()[:4])


class Watch:
    """How many cores other processes keep busy from now on: the machine's CPU time minus this run's own."""

    def __init__(self) -> None:
        self.started, self.start = time.perf_counter(), cpu_seconds()

    def others(self) -> float:
        """Cores used by other processes, on average since the start."""
        machine, mine = (now - then for now, then in zip(cpu_seconds(), self.start, strict=True))
        return max(machine - mine, 0.0) / (time.perf_counter() - self.started)

    def busy(self) -> bool:
        """True when other processes took more than a tenth of the cores: then the figures are too low."""
        return self.others() > 0.1 * (os.cpu_count() or 1)


def flag_busy(rows: list[Row], watch: Watch) -> list[Row]:
    """Say in the note of each timing row when other processes were busy while it was measured."""
    if watch.busy():
        for row in rows:
            if row.unit != "GB":
                row.note = f"{row.note}; BUSY: other processes used {watch.others():.2f} cores".removeprefix("; ")
    return rows


def others_line(watch: Watch) -> str:
    """How busy other processes kept the machine during the whole run."""
    verdict = "busy: figures marked BUSY are too low" if watch.busy() else "quiet enough"
    return (
        f"other processes used {watch.others():.2f} of {os.cpu_count()} cores on average during the run "
        f"({verdict}); the run took {time.perf_counter() - watch.started:.0f} s"
    )


