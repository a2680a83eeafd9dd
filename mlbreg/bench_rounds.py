"""The timing rounds of `mlbreg bench`: when to stop, in which order, and how noisy the result is.

A round times every (backend, batch size) once; each timing is the median per-call time of a
few blocks of calls (`time_call`). Rounds repeat until the relative spread (IQR / median) of the
per-round times of every (backend, batch size) is at most `max_spread`, or a cap is reached
(`decide`); the reported time is the median over the per-round times, so one disturbed round
does not move it, and its spread is the IQR over the rounds (`summarize`). Within a round the
backends go one at a time, in an order that changes from one batch size and round to the next
(`round_order`), so no backend always runs right after the same other one (whose thread pool
may still be spinning). Nothing here imports torch: the stopping rule and the order are
plain functions of the per-round times, testable with injected series.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

MIN_ROUNDS = 3
MAX_ROUNDS = 15
MAX_SECONDS = 60.0
MAX_SPREAD = 0.10  # relative IQR (IQR / median) over rounds: stop below it, warn above it
WARMUP_SECONDS = 0.02  # untimed calls after every switch of backend (a pool waking up, another going to sleep)


@dataclass(frozen=True)
class RoundOptions:
    min_rounds: int = MIN_ROUNDS
    max_rounds: int = MAX_ROUNDS
    max_seconds: float = MAX_SECONDS
    max_spread: float = MAX_SPREAD


@dataclass(frozen=True)
class Stat:
    """The median over rounds of one (backend, batch size)'s per-round times, and their IQR."""

    median: float
    iqr: float
    rounds: int

    @property
    def relative(self) -> float:
        """IQR / median (inf for a zero median with a non-zero IQR)."""
        if self.median > 0:
            return self.iqr / self.median
        return 0.0 if self.iqr == 0 else float("inf")


def stat(values: Sequence[float]) -> Stat:
    """Median and interquartile range (inclusive quartiles: with 3 values, half their range)."""
    if len(values) < 2:
        return Stat(float(values[0]) if values else float("nan"), 0.0, len(values))
    q1, med, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return Stat(med, q3 - q1, len(values))


def summarize(per_round: dict[Hashable, list[float]]) -> dict[Hashable, Stat]:
    return {key: stat(values) for key, values in per_round.items()}


def decide(per_round: dict[Hashable, list[float]], rounds: int, elapsed: float, opts: RoundOptions) -> str | None:
    """None to time another round, else why to stop. Rounds below `min_rounds` always run; then the
    loop stops as soon as every spread is at most `max_spread`, else at `max_rounds` rounds or once
    `max_seconds` have passed (no round starts after that)."""
    if rounds < opts.min_rounds:
        return None
    worst = max((s.relative for s in summarize(per_round).values()), default=0.0)
    if worst <= opts.max_spread:
        return f"every spread <= {100 * opts.max_spread:g}% after {rounds} rounds"
    if rounds >= opts.max_rounds:
        return f"cap of {opts.max_rounds} rounds reached, largest spread {100 * worst:.0f}%"
    if elapsed >= opts.max_seconds:
        return f"cap of {opts.max_seconds:g} s reached after {rounds} rounds, largest spread {100 * worst:.0f}%"
    return None


def round_order(labels: Sequence[str], index: int) -> list[str]:
    """The backends' order for the `index`-th (round, batch size) group: rotated by index // 2 and
    reversed on odd indices, so every backend leads some groups and follows different ones (a plain
    rotation would keep each pair of neighbours, across the groups' boundaries too)."""
    n = len(labels)
    if n == 0:
        return []
    k = (index // 2) % n
    order = list(labels[k:]) + list(labels[:k])
    return order[::-1] if index % 2 else order


def run_rounds(
    measure: Callable[[str, int], float],
    labels: Sequence[str],
    batch_sizes: Sequence[int],
    opts: RoundOptions,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[dict[tuple[str, int], list[float]], str]:
    """(label, batch size) -> per-round times, and why the rounds stopped. `measure(label, b)`
    times one (backend, batch size) once; one of them runs at a time."""
    per_round: dict[tuple[str, int], list[float]] = {(label, b): [] for b in batch_sizes for label in labels}
    start, rounds, group = clock(), 0, 0
    while True:
        for b in batch_sizes:
            for label in round_order(labels, group):
                per_round[(label, b)].append(measure(label, b))
            group += 1
        rounds += 1
        reason = decide(per_round, rounds, clock() - start, opts)
        if reason is not None:
            return per_round, reason


def time_call(
    fn: Callable[[], object],
    min_run_time: float,
    warmup: float = WARMUP_SECONDS,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Median seconds per call of `fn` over blocks of calls lasting `min_run_time` in all, after
    untimed calls for `warmup` seconds (at least one). A block is as many calls as take about
    max(1 ms, min_run_time / 50), estimated from the fastest warm-up call."""
    fastest, begin = float("inf"), clock()
    while True:
        t0 = clock()
        fn()
        t1 = clock()
        fastest = min(fastest, t1 - t0)
        if t1 - begin >= warmup:
            break
    per_block = max(1, int(max(1e-3, min_run_time / 50) / max(fastest, 1e-9)))
    blocks: list[float] = []
    begin = clock()
    while not blocks or clock() - begin < min_run_time:
        t0 = clock()
        for _ in range(per_block):
            fn()
        blocks.append((clock() - t0) / per_block)
    return statistics.median(blocks)


def warning_lines(stats: dict[tuple[str, int], Stat], max_spread: float) -> list[str]:
    """One WARNING line per (backend, batch size) whose spread exceeds `max_spread`."""
    lines = []
    for (label, b), s in stats.items():
        if s.relative > max_spread:
            lines.append(
                f"WARNING: {label} batch {b}: spread {pct(s.relative)} of its median "
                f"({1e3 * s.iqr:.4f} ms IQR on {1e3 * s.median:.4f} ms over {s.rounds} rounds) is above "
                f"{100 * max_spread:g}%: the machine was busy while timing, this time is not reliable; "
                f"rerun on an idle machine with more rounds (--max-rounds, --max-seconds)"
            )
    return lines


def pct(x: float) -> str:
    """A relative spread as a percentage (one decimal below 10%)."""
    if x == float("inf"):
        return "inf%"
    return f"{100 * x:.1f}%" if x < 0.1 else f"{100 * x:.0f}%"
