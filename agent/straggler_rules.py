"""Straggler detection: which ranks hold a synchronous job back, by how much, since when, and why.

In synchronous data parallelism every rank's step lasts as long as the slowest rank's: the fast ranks wait for
the slow one inside the gradient all-reduce. So a straggler does not show in step time; it shows in the split
between a rank's own work and its waiting. Its **busy time** (step time minus time blocked on communication:
data wait, forward, backward, optimizer, host overhead) is the longest, and the others wait for it.

Pure Python plus numpy (no Textual, no torch, no I/O). The same rules run in two places, so the two never
disagree on the same input: each agent judges its own node's ranks as their steps arrive (agent/stragglers.py:
events, alerts, ``/metrics``), and the dashboard and ``megascope status`` judge every rank of the job
(dashboard/model/stragglers.py re-exports this module). The benchmark drives it directly.

Public API
----------
``StragglerDetector(config=StragglerConfig())``
    ``observe(step, timings, wall_time=0.0) -> StepResult``: one step's per-rank :class:`RankTiming` (any subset
    of the ranks: ranks may join late or vanish); returns the flags raised and cleared at this step.
    ``observe_arrays(step, ranks, nodes, step_seconds, compute_seconds, data_wait_seconds, comm_wait_seconds,
    gc_pause_seconds, device_compute_seconds=None, wall_time=0.0)``: the same with one sequence per field, the
    fast path for thousands of ranks. Steps must come in increasing order; an older or repeated step is ignored.
    ``active()``: the flags standing now; ``history()``: every flag raised (cleared ones carry ``cleared_step``);
    ``heat(steps)``: ranks x recent steps of compute-time ratio to the median rank, for the heat map;
    ``threshold``: the bar a rank's busy ratio must reach now (``config.threshold``, raised on a noisy cluster).
``StragglerConfig``: the tunables (``threshold``, ``window``, ``grace``, ``noise_z``, ``min_ranks``) with
    defaults; ``DEFAULT_CONFIG`` is what the dashboard uses and the help screen lists.
``StragglerFlag``: rank, node, likely ``cause`` (:class:`Cause`), busy ``ratio`` to the median rank,
    ``cost_seconds`` per step (and ``cost_fraction`` of the median step), ``since_step``/``since_time`` (when
    the slowdown began), ``flagged_step``, ``cleared_step`` (None while it stands), ``node_wide``.

The rules
---------
1. At each step a rank's **ratio** is its busy time over the median of the other ranks' busy times.
2. **Level.** Over the last ``window + grace`` steps (``L``) a rank's **level** is the median of its ratios: one
   noisy step moves a median little, so a 10% straggler stands out of 2% step-to-step noise, and on a noisy
   host (8%) a 30% one does.
3. **Noise.** sigma is the typical step-to-step spread of a rank's ratio: 1.4826 x the median over ranks of each
   rank's median absolute deviation over the last ``NOISE_STEPS`` steps (robust to the stragglers themselves),
   measured every ``NOISE_EVERY`` steps; the median of the last ``NOISE_HISTORY`` measurements is used. The
   bar is ``T = 1 + max(threshold - 1, z * 1.2533 * sigma / sqrt(L))``, the second term being ``z`` standard
   errors of a median of ``L`` steps, with ``z = sqrt(noise_z**2 + 2 ln n)`` for ``n`` ranks (the largest of
   ``n`` normal deviations grows like ``sqrt(2 ln n)``, so a big job is not flagged more often than a small
   one). On a quiet GPU cluster ``T`` is ``threshold``; on a noisy one it rises so that noise is not flagged.
   The first ``WARMUP_STEPS`` steps (start-up: wildly uneven) are not used.
4. **Persistence.** A rank is flagged when its level reaches ``T`` and at least ``window`` of the last ``L``
   steps showed the slowdown: were at least halfway from 1 to its level, and at least three quarters of ``T``.
   The second condition is what keeps a transient burst of fewer than ``window`` steps from being flagged
   however large it is (a median only needs half the steps); ``grace`` lets a straggler's noisy steps dip
   without resetting anything. The flag clears once the level is
   back below halfway to ``T`` (hysteresis, so a rank near the bar does not flicker), or when the rank stopped
   reporting for ``L`` steps.
5. **Cost** to the job: how much faster the step would be were this rank as fast as the median rank, that is
   (step time) - (step time with the rank replaced by the median) = its busy time minus the median busy time,
   the median of that over the last ``L`` steps. With several stragglers each one's cost is its own excess:
   fixing only the worst saves the difference to the second worst.
6. **Cause**, from the rank's median excess over the median rank in each part of the step: garbage collection
   pauses for at least half of it: a host stall (GC); on a GPU, device compute (CUDA events) for less than half
   of the host-measured compute excess: a host stall (the device waited for the CPU); otherwise whichever of
   compute (slow compute on the device), data wait (slow data loading) or the rest (a host stall) is largest.
7. **Slow link.** With at least three nodes, a node whose ranks all wait longer in collectives than the median
   node (``1 +`` its mean wait minus the median node's, over the median busy time), while not being busy longer
   themselves, goes through rules 2 to 4 like a rank; each of its ranks gets a flag with cause ``LINK``. A rank
   already flagged for its own work keeps that flag.

Cost: O(ranks) numpy per step (medians over ``L`` rows and a few passes); at 4,096 ranks a few milliseconds
(``bench/stragglers.py`` measures it).
"""

from __future__ import annotations

import enum
import math
import statistics
import warnings
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

NOISE_STEPS = 16
"""Steps over which each rank's own step-to-step spread is measured (rule 2)."""
NOISE_EVERY = 4
"""The noise is measured again every this-many steps (it changes slowly; measuring costs two 2-D medians)."""
NOISE_HISTORY = 16
"""sigma is the median of this many recent measurements (about 64 steps): one measurement over 16 steps of a
few ranks is itself noisy, and a low one would lower the bar for a while."""
MIN_NOISE_STEPS = 4
"""No flag before this many steps: the noise is not known yet."""
WARMUP_STEPS = 3
"""The first steps the detector sees are ignored: a run's first steps (allocation, warm-up) are wildly uneven."""
_MEDIAN_STDERR = 1.2533  # standard error of a median of n normal samples is 1.2533 * sigma / sqrt(n)
HEAT_STEPS = 240
"""Steps of compute-time ratios kept for the heat map."""
HISTORY_FLAGS = 1000
"""Flags kept in ``history()`` (active ones are always kept)."""
_MAD_TO_SIGMA = 1.4826  # median absolute deviation -> standard deviation, for normal noise


@dataclass(frozen=True)
class StragglerConfig:
    """The tunables of the rules (see the module docstring); the help screen lists them."""

    threshold: float = 1.05
    """A rank is slow when its busy time is at least this many times the median rank's (the least bar: a noisy
    cluster raises it, rule 3)."""
    window: int = 6
    """Steps a slowdown must last to be flagged."""
    grace: int = 2
    """Noisy steps tolerated: a rank is judged over the last ``window + grace`` steps."""
    noise_z: float = 4.5
    """The bar is at least this many standard errors (of a median over ``window + grace`` steps) above 1, for
    one rank; more ranks raise it a little (rule 3)."""
    min_ranks: int = 3
    """Steps with fewer ranks are skipped: with two there is no majority to call normal."""

    def __post_init__(self) -> None:
        if not self.threshold > 1.0:
            raise ValueError(f"threshold must be more than 1, got {self.threshold}")
        if self.window < 1 or self.grace < 0:
            raise ValueError(f"window must be >= 1 and grace >= 0, got {self.window} and {self.grace}")
        if self.noise_z < 0 or self.min_ranks < 3:
            raise ValueError("noise_z must be >= 0 and min_ranks >= 3")

    @property
    def lookback(self) -> int:
        return self.window + self.grace

    def describe(self) -> list[tuple[str, str]]:
        """(name, meaning with its value) for each tunable, for the help screen."""
        return [
            ("threshold", f"{self.threshold:g}x: a rank is slow when its busy time (step minus waiting for others), "
             f"median over its last {self.lookback} steps, is >= {self.threshold:g}x the median rank's"),
            ("window", f"{self.window} steps: the slowdown must show in {self.window} of the last {self.lookback} "
             "steps; shorter bursts are not flagged; the flag clears when the slowdown ends"),
            ("noise", f"{self.noise_z:g} standard errors: on a noisy cluster the bar rises above the ranks' "
             "step-to-step spread"),
        ]  # fmt: skip


DEFAULT_CONFIG = StragglerConfig()


class Cause(str, enum.Enum):
    """The likely reason a rank is slow; the value is the short label the tables show."""

    DEVICE = "compute"
    DATA = "data"
    GC = "GC"
    HOST = "host"
    LINK = "link"

    @property
    def text(self) -> str:
        return _CAUSE_TEXT[self]


_CAUSE_TEXT = {
    Cause.DEVICE: "slow compute on its device",
    Cause.DATA: "slow data loading",
    Cause.GC: "host stalls: garbage collection",
    Cause.HOST: "host stalls on the CPU side",
    Cause.LINK: "slow link: every rank of its node waits longer in collectives",
}


@dataclass(frozen=True)
class RankTiming:
    """One rank's timings of one step, in seconds."""

    rank: int
    node: str
    step_seconds: float
    compute_seconds: float
    """Forward + backward compute, host-measured (waiting for gradient communication excluded)."""
    data_wait_seconds: float
    comm_wait_seconds: float
    """Blocked on communication after its own compute was done: mostly waiting for the other ranks."""
    gc_pause_seconds: float = 0.0
    device_compute_seconds: float | None = None
    """GPU only: the device's own compute time (CUDA events)."""


@dataclass(frozen=True)
class StragglerFlag:
    rank: int
    node: str
    cause: Cause
    ratio: float
    """Busy time over the median rank's, median over the last ``window + grace`` steps (for LINK: the node's
    ``1 +`` extra wait over the median busy time)."""
    cost_seconds: float
    """Estimated step time the job loses to this rank, per step."""
    cost_fraction: float
    """``cost_seconds`` over the median rank's step time."""
    since_step: int
    """Where the slowdown began: the first of the last ``window`` steps that showed it (noise may put it a step
    or two early)."""
    since_time: float
    flagged_step: int
    flagged_time: float
    threshold: float
    """The bar the ratio had to reach when the flag was raised."""
    node_wide: bool = False
    """Every rank of the node is flagged (a whole slow node)."""
    cleared_step: int | None = None
    cleared_time: float | None = None
    cleared_reason: str = ""
    """``recovered`` or ``stopped reporting``."""

    @property
    def active(self) -> bool:
        return self.cleared_step is None

    def describe(self) -> str:
        """One line for the event log and the status text."""
        whole = " (its whole node is slow)" if self.node_wide else ""
        measure = "the median node's collective wait" if self.cause is Cause.LINK else "the median rank's busy time"
        return (
            f"rank {self.rank} on {self.node} is a straggler{whole}: {self.ratio:.2f}x {measure}, costs the job "
            f"~{self.cost_seconds * 1000:,.0f} ms/step ({100 * self.cost_fraction:.0f}%) since step "
            f"{self.since_step}; likely {self.cause.text}"
        )


@dataclass(frozen=True)
class StepResult:
    raised: list[StragglerFlag] = field(default_factory=list)
    cleared: list[StragglerFlag] = field(default_factory=list)


@dataclass(frozen=True)
class HeatMap:
    """Compute-time ratio to the median rank: ``ratios[i, j]`` is ``ranks[i]`` at ``steps[j]`` (NaN: no data)."""

    steps: list[int]
    ranks: list[int]
    nodes: list[str]
    ratios: FloatArray


@dataclass
class _Episode:
    """A flag while it stands (mutable: its figures follow the latest steps)."""

    rank: int
    column: int
    node: str
    cause: Cause
    ratio: float
    cost_seconds: float
    cost_fraction: float
    since_step: int
    since_time: float
    flagged_step: int
    flagged_time: float
    threshold: float
    node_wide: bool = False
    cleared_step: int | None = None
    cleared_time: float | None = None
    cleared_reason: str = ""

    def flag(self) -> StragglerFlag:
        return StragglerFlag(
            rank=self.rank, node=self.node, cause=self.cause, ratio=self.ratio, cost_seconds=self.cost_seconds,
            cost_fraction=self.cost_fraction, since_step=self.since_step, since_time=self.since_time,
            flagged_step=self.flagged_step, flagged_time=self.flagged_time, threshold=self.threshold,
            node_wide=self.node_wide, cleared_step=self.cleared_step, cleared_time=self.cleared_time,
            cleared_reason=self.cleared_reason,
        )  # fmt: skip


# Parts of a step whose excess over the median rank is kept, to estimate the cost and the cause.
_BUSY, _COMPUTE, _DATA, _GC, _DEVICE = range(5)


def _median(values: FloatArray) -> float:
    """Median of a 1-D array without NaN (``np.median``'s checks cost more than the work at these sizes)."""
    n = values.shape[0]
    if n == 0:
        return math.nan
    half = n // 2
    if n % 2:
        return float(np.partition(values, half)[half])
    low, high = np.partition(values, (half - 1, half))[half - 1 : half + 1]
    return 0.5 * float(low + high)


def _others_median(values: FloatArray) -> FloatArray:
    """For each value, the median of all the other values (one sort for all of them)."""
    n = values.shape[0]
    order = np.argsort(values, kind="stable")
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)
    ordered = values[order]
    # Without the value at sorted position k, the others' sorted index j holds ordered[j] if j < k else ordered[j+1].
    half = (n - 1) // 2
    if (n - 1) % 2:
        return np.where(position > half, ordered[half], ordered[half + 1])
    low = np.where(position > half - 1, ordered[half - 1], ordered[half])
    high = np.where(position > half, ordered[half], ordered[half + 1])
    return (low + high) / 2.0


def _nanmedian(values: FloatArray) -> float:
    """Median of the non-NaN values of a 1-D array; NaN when there are none (and no warning)."""
    return _median(values[~np.isnan(values)])


class _Smoothed:
    """The median of the last few measurements of a slowly changing figure."""

    def __init__(self, size: int) -> None:
        self._values: deque[float] = deque(maxlen=size)

    def add(self, value: float | None) -> float | None:
        """Record ``value`` (None: nothing measured); the median of what is recorded, None while nothing is."""
        if value is not None:
            self._values.append(value)
        return statistics.median(self._values) if self._values else None


def _window_level(block: FloatArray, bar: float) -> tuple[FloatArray, FloatArray, npt.NDArray[np.int64]]:
    """Rules 2 and 4 for each column of ``block`` (rows: recent steps): its level (median ratio; a missing step
    counts as a normal one, 1), the mark a step must reach to count as showing the slowdown, and how many did.

    The mark is halfway from 1 to the level (so a big burst cannot borrow normal steps), and at least three
    quarters of the bar (so a few huge steps lifting the median cannot borrow noisy ones either).
    """
    level = np.median(np.where(np.isnan(block), 1.0, block), axis=0)
    mark = np.maximum(1.0 + (level - 1.0) / 2.0, 1.0 + 0.75 * (bar - 1.0))
    with np.errstate(invalid="ignore"):  # NaN (missing) compares False: a missing step does not count
        count = (block >= mark).sum(axis=0)
    return level, mark, count


def _noise(block: FloatArray) -> float | None:
    """Rule 2's sigma over ``block`` (rows: steps, columns: ranks or nodes); None when too little is known."""
    if block.shape[0] < MIN_NOISE_STEPS:
        return None
    complete = block[:, ~np.isnan(block).any(axis=0)]  # columns present at every step of the block
    if complete.shape[1] == 0:
        return None
    centre = np.median(complete, axis=0)
    mad = np.median(np.abs(complete - centre), axis=0)
    return float(_MAD_TO_SIGMA * np.median(mad))


class StragglerDetector:
    """Runs the rules step by step; see the module docstring. Not thread-safe: call from one thread."""

    def __init__(self, config: StragglerConfig = DEFAULT_CONFIG) -> None:
        self.config = config
        self._rows = max(config.lookback, NOISE_STEPS)
        """Steps kept in the ring buffers (a row per step, a column per rank)."""
        self._capacity = 0
        self._columns: dict[int, int] = {}
        self._ranks: list[int] = []
        self._node_of: list[str] = []
        self._ratio = np.empty((self._rows, 0))
        """Busy-time ratio to the median, NaN where the rank did not report."""
        self._excess = np.empty((5, self._rows, 0))
        """Seconds above the median rank in each part (``_BUSY`` ...), NaN where the rank did not report."""
        self._median_step = np.full(self._rows, np.nan)
        self._heat = np.empty((HEAT_STEPS, 0), dtype=np.float32)
        self._last_seen = np.empty(0, dtype=np.int64)
        """Index (count of observed steps) of each column's last report."""
        self._steps = np.zeros(self._rows, dtype=np.int64)
        self._times = np.zeros(self._rows)
        self._heat_steps = np.zeros(HEAT_STEPS, dtype=np.int64)
        self._count = 0
        """Steps observed so far (after the warm-up)."""
        self._warmup = 0
        self.last_step: int | None = None
        # Nodes, for the slow-link rule.
        self._node_columns: dict[str, int] = {}
        self._node_names: list[str] = []
        self._link = np.empty((self._rows, 0))
        """Per node: 1 + (its mean collective wait - the median node's) / median busy time; NaN when absent."""
        self._link_excess = np.empty((self._rows, 0))
        self._active: dict[int, _Episode] = {}
        self._history: list[_Episode] = []
        self._rank_noise = _Smoothed(NOISE_HISTORY)
        self._link_noise = _Smoothed(NOISE_HISTORY)
        self.threshold = math.inf
        """The bar a busy ratio must reach now (rule 2); infinite until the noise is known."""
        self.link_threshold = math.inf
        self._cache_key: tuple[tuple[int, ...], tuple[str, ...]] | None = None
        self._cache_cols = np.empty(0, dtype=np.int64)
        self._cache_node_idx = np.empty(0, dtype=np.int64)

    # -- public -------------------------------------------------------------------------------------------

    def observe(self, step: int, timings: Sequence[RankTiming], wall_time: float = 0.0) -> StepResult:
        """Feed one step's timings (any subset of the ranks); returns the flags raised and cleared."""
        devices = [t.device_compute_seconds for t in timings]
        return self.observe_arrays(
            step,
            [t.rank for t in timings],
            [t.node for t in timings],
            [t.step_seconds for t in timings],
            [t.compute_seconds for t in timings],
            [t.data_wait_seconds for t in timings],
            [t.comm_wait_seconds for t in timings],
            [t.gc_pause_seconds for t in timings],
            None if any(d is None for d in devices) else [d for d in devices if d is not None],
            wall_time,
        )

    def observe_arrays(
        self,
        step: int,
        ranks: Sequence[int],
        nodes: Sequence[str],
        step_seconds: Sequence[float] | FloatArray,
        compute_seconds: Sequence[float] | FloatArray,
        data_wait_seconds: Sequence[float] | FloatArray,
        comm_wait_seconds: Sequence[float] | FloatArray,
        gc_pause_seconds: Sequence[float] | FloatArray,
        device_compute_seconds: Sequence[float] | FloatArray | None = None,
        wall_time: float = 0.0,
    ) -> StepResult:
        """:meth:`observe` with one sequence per field (all the same length, one entry per rank)."""
        if len(ranks) < self.config.min_ranks or (self.last_step is not None and step <= self.last_step):
            return StepResult()
        step_s = np.asarray(step_seconds, dtype=np.float64)
        comm = np.asarray(comm_wait_seconds, dtype=np.float64)
        busy = np.maximum(step_s - comm, 0.0)
        median_busy = _median(busy)
        if not median_busy > 0 or not math.isfinite(median_busy):
            return StepResult()  # no usable timings (a script that reports none)
        self.last_step = step
        self._warmup += 1
        if self._warmup <= WARMUP_STEPS:
            return StepResult()
        cols, node_idx = self._columns_for(ranks, nodes)
        compute = np.asarray(compute_seconds, dtype=np.float64)
        data = np.asarray(data_wait_seconds, dtype=np.float64)
        gc_pause = np.asarray(gc_pause_seconds, dtype=np.float64)

        row = self._count % self._rows
        self._count += 1
        self._steps[row] = step
        self._times[row] = wall_time
        self._median_step[row] = _median(step_s)
        self._last_seen[cols] = self._count
        # Each rank against the median of the others: "the job with this rank replaced by the median rank". With
        # few ranks it also keeps a rank from pulling the median towards itself.
        others = _others_median(busy)
        ratio_row = self._ratio[row]
        ratio_row.fill(np.nan)
        ratio_row[cols] = np.divide(busy, others, out=np.ones_like(busy), where=others > 0)
        median_compute = _median(compute)
        parts: list[tuple[FloatArray, float | FloatArray]] = [
            (busy, others), (compute, median_compute), (data, _median(data)), (gc_pause, _median(gc_pause))
        ]  # fmt: skip
        if device_compute_seconds is not None:
            device = np.asarray(device_compute_seconds, dtype=np.float64)
            parts.append((device, _median(device)))
        for index in range(5):
            excess_row = self._excess[index, row]
            excess_row.fill(np.nan)
            if index < len(parts):
                values, median = parts[index]
                excess_row[cols] = values - median
        heat_row = self._count % HEAT_STEPS
        self._heat_steps[heat_row] = step
        self._heat[heat_row].fill(np.nan)
        if median_compute > 0:
            self._heat[heat_row, cols] = compute / median_compute

        # The ring fills from row 0, so the first ``filled`` rows are the steps seen so far. The noise moves
        # slowly; measuring it every few steps keeps the per-step cost down.
        filled = min(self._count, self._rows)
        if self._count % NOISE_EVERY == 0 or self._count <= NOISE_STEPS:
            sigma = self._rank_noise.add(_noise(self._ratio[:filled, : len(self._ranks)]))
            self.threshold = self._bar(sigma, len(ranks))

        raised: list[_Episode] = []
        cleared: list[_Episode] = []
        self._rank_rules(raised, cleared, step, wall_time)
        self._link_rules(raised, cleared, step, wall_time, cols, node_idx, comm, busy / median_busy, median_busy)
        if raised or cleared:
            self._mark_node_wide()
        self._refresh_active()
        return StepResult(raised=[e.flag() for e in raised], cleared=[e.flag() for e in cleared])

    def _bar(self, sigma: float | None, count: int) -> float:
        """Rule 3: the level one of ``count`` ranks (or nodes) must reach to be flagged, given the noise sigma."""
        if sigma is None:
            return math.inf
        stderr = _MEDIAN_STDERR * sigma / math.sqrt(self.config.lookback)
        # The largest of n normal deviations grows like sqrt(2 ln n): raising z so keeps the job's false-flag rate
        # that of one rank, however many ranks it has.
        z = math.sqrt(self.config.noise_z**2 + 2.0 * math.log(max(count, 1)))
        return 1.0 + max(self.config.threshold - 1.0, z * stderr)

    def active(self) -> list[StragglerFlag]:
        """Flags standing now, by rank."""
        return [self._active[rank].flag() for rank in sorted(self._active)]

    def history(self) -> list[StragglerFlag]:
        """Every flag raised and still remembered, oldest first; active ones show their latest figures."""
        return [episode.flag() for episode in self._history]

    def heat(self, steps: int) -> HeatMap:
        """The last ``steps`` observed steps (oldest first) of compute-time ratio for every rank seen."""
        steps = max(0, min(steps, HEAT_STEPS, self._count))
        rows = [(self._count - steps + 1 + i) % HEAT_STEPS for i in range(steps)]
        n = len(self._ranks)
        ratios = self._heat[rows, :n].T.astype(np.float64) if rows else np.empty((n, 0))
        return HeatMap(
            steps=[int(self._heat_steps[r]) for r in rows], ranks=list(self._ranks), nodes=list(self._node_of),
            ratios=ratios,
        )  # fmt: skip

    # -- internals ----------------------------------------------------------------------------------------

    def _columns_for(
        self, ranks: Sequence[int], nodes: Sequence[str]
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """Column of each rank and index of each node, growing the buffers for newcomers.

        A job reports the same ranks step after step, so the last answer is reused when the input repeats.
        """
        key = (tuple(ranks), tuple(nodes))
        if key == self._cache_key:
            return self._cache_cols, self._cache_node_idx
        cols = np.empty(len(ranks), dtype=np.int64)
        node_idx = np.empty(len(ranks), dtype=np.int64)
        for i, (rank, node) in enumerate(zip(ranks, nodes, strict=True)):
            col = self._columns.get(rank)
            if col is None:
                col = self._columns[rank] = len(self._ranks)
                self._ranks.append(rank)
                self._node_of.append(node)
                self._grow(len(self._ranks))
            self._node_of[col] = node
            cols[i] = col
            n = self._node_columns.get(node)
            if n is None:
                n = self._node_columns[node] = len(self._node_names)
                self._node_names.append(node)
                self._link = _grow_columns(self._link, len(self._node_names))
                self._link_excess = _grow_columns(self._link_excess, len(self._node_names))
            node_idx[i] = n
        self._cache_key, self._cache_cols, self._cache_node_idx = key, cols, node_idx
        return cols, node_idx

    def _grow(self, needed: int) -> None:
        if needed <= self._capacity:
            return
        capacity = max(needed, 2 * self._capacity, 8)
        self._ratio = _grow_columns(self._ratio, capacity)
        self._excess = np.stack([_grow_columns(self._excess[i], capacity) for i in range(5)])
        self._heat = _grow_columns(self._heat, capacity)
        last_seen = np.zeros(capacity, dtype=np.int64)
        last_seen[: self._capacity] = self._last_seen
        self._last_seen = last_seen
        self._capacity = capacity

    def _recent_rows(self, count: int) -> list[int]:
        """Ring rows of the last ``count`` observed steps, oldest first."""
        count = min(count, self._count, self._rows)
        return [(self._count - count + i) % self._rows for i in range(count)]

    def _rank_rules(self, raised: list[_Episode], cleared: list[_Episode], step: int, wall_time: float) -> None:
        config = self.config
        n = len(self._ranks)
        rows = self._recent_rows(config.lookback)
        recent = self._ratio[rows, :n]
        level, mark, count = _window_level(recent, self.threshold)
        slow = (level >= self.threshold) & (count >= config.window)
        calm = level < 1.0 + (self.threshold - 1.0) / 2.0
        # Clear first, so a rank that recovered and turned slow again starts a new flag.
        for episode in list(self._active.values()):
            col = episode.column
            gone = self._count - int(self._last_seen[col]) >= config.lookback
            if gone:
                self._clear(cleared, episode, step, wall_time, "stopped reporting")
            elif episode.cause is not Cause.LINK and calm[col] and self._last_seen[col] == self._count:
                # Only a rank that reports can recover; a silent one is cleared as gone once it has been long enough.
                self._clear(cleared, episode, step, wall_time, "recovered")
        for col in np.flatnonzero(slow).tolist():
            rank = self._ranks[col]
            current = self._active.get(rank)
            if current is not None:
                if current.cause is not Cause.LINK:
                    continue
                # Its own work is slow: that explains the waiting better than the link does.
                self._clear(cleared, current, step, wall_time, "explained by its own slowness")
            first = self._onset([r for r in rows if self._ratio[r, col] >= mark[col]])
            self._raise(raised, col, self._cause(col), int(self._steps[first]), float(self._times[first]), step,
                        wall_time)  # fmt: skip

    def _link_rules(
        self,
        raised: list[_Episode],
        cleared: list[_Episode],
        step: int,
        wall_time: float,
        cols: npt.NDArray[np.int64],
        node_idx: npt.NDArray[np.int64],
        comm: FloatArray,
        ratio: FloatArray,
        median_busy: float,
    ) -> None:
        config = self.config
        row = (self._count - 1) % self._rows
        self._link[row].fill(np.nan)
        self._link_excess[row].fill(np.nan)
        nodes = len(self._node_names)
        counts = np.bincount(node_idx, minlength=nodes)
        present = np.flatnonzero(counts)
        if len(present) < 3:
            self.link_threshold = math.inf
            return
        node_wait = np.bincount(node_idx, weights=comm, minlength=nodes)[present] / counts[present]
        node_busy = np.bincount(node_idx, weights=ratio, minlength=nodes)[present] / counts[present]
        excess = node_wait - _median(node_wait)
        # A node that is itself busy longer is waited for, not waiting: rule 3 covers it, so it reads as normal.
        link = np.where(node_busy < self.threshold, 1.0 + excess / median_busy, 1.0)
        self._link[row, present] = link
        self._link_excess[row, present] = excess
        filled = min(self._count, self._rows)
        if self._count % NOISE_EVERY == 0 or self._count <= NOISE_STEPS:
            self.link_threshold = self._bar(self._link_noise.add(_noise(self._link[:filled, :nodes])), len(present))
        rows = self._recent_rows(config.lookback)
        level, mark, count = _window_level(self._link[rows, :nodes], self.link_threshold)
        slow_nodes = np.flatnonzero((level >= self.link_threshold) & (count >= config.window)).tolist()
        calm = level < 1.0 + (self.link_threshold - 1.0) / 2.0
        for episode in [e for e in self._active.values() if e.cause is Cause.LINK]:
            if calm[self._node_columns[episode.node]]:
                self._clear(cleared, episode, step, wall_time, "recovered")
        for n in slow_nodes:
            node = self._node_names[n]
            first = self._onset([r for r in rows if self._link[r, n] >= mark[n]])
            for col in cols[node_idx == n].tolist():
                if self._ranks[col] not in self._active:
                    self._raise(raised, col, Cause.LINK, int(self._steps[first]), float(self._times[first]), step,
                                wall_time, node=node)  # fmt: skip

    def _onset(self, slow_rows: list[int]) -> int:
        """The row where the slowdown began: the earliest of the last ``window`` slow steps (an earlier noisy step
        that happened to look slow is left out)."""
        return slow_rows[-self.config.window] if len(slow_rows) >= self.config.window else slow_rows[0]

    def restart_from(self, step: int) -> None:
        """Accept steps from ``step`` again (the job restarted from a checkpoint and redoes them)."""
        if self.last_step is not None and step <= self.last_step:
            self.last_step = step - 1

    def _cause(self, col: int) -> Cause:
        rows = self._recent_rows(self.config.lookback)
        busy, compute, data, gc_pause, device = (_nanmedian(self._excess[i, rows, col]) for i in range(5))
        busy = max(busy, 1e-12)
        if gc_pause >= 0.5 * busy:
            return Cause.GC
        if math.isfinite(device) and compute > 0 and device < 0.5 * compute:
            return Cause.HOST  # the host took longer, the device did not: it waited for the CPU
        rest = busy - compute - data
        largest = max((compute, Cause.DEVICE), (data, Cause.DATA), (rest, Cause.HOST), key=lambda item: item[0])
        return largest[1]

    def _raise(
        self,
        raised: list[_Episode],
        col: int,
        cause: Cause,
        since_step: int,
        since_time: float,
        step: int,
        wall_time: float,
        node: str | None = None,
    ) -> None:
        threshold = self.link_threshold if cause is Cause.LINK else self.threshold
        episode = _Episode(
            rank=self._ranks[col], column=col, node=node or self._node_of[col], cause=cause, ratio=math.nan,
            cost_seconds=0.0, cost_fraction=0.0, since_step=since_step, since_time=since_time, flagged_step=step,
            flagged_time=wall_time, threshold=threshold,
        )  # fmt: skip
        self._update(episode)
        self._active[episode.rank] = episode
        self._history.append(episode)
        raised.append(episode)
        if len(self._history) > HISTORY_FLAGS:
            # Forget the oldest cleared flag; active ones stay.
            oldest = next((e for e in self._history if e.cleared_step is not None), None)
            if oldest is not None:
                self._history.remove(oldest)

    def _clear(self, cleared: list[_Episode], episode: _Episode, step: int, wall_time: float, reason: str) -> None:
        episode.cleared_step, episode.cleared_time, episode.cleared_reason = step, wall_time, reason
        del self._active[episode.rank]
        cleared.append(episode)

    def _update(self, episode: _Episode) -> None:
        """Refresh a standing flag's ratio and cost from the last ``window`` steps."""
        rows = self._recent_rows(self.config.lookback)
        col = episode.column
        if episode.cause is Cause.LINK:
            n = self._node_columns[episode.node]
            ratio = _nanmedian(self._link[rows, n])
            cost = _nanmedian(self._link_excess[rows, n])
        else:
            ratio = _nanmedian(self._ratio[rows, col])
            cost = _nanmedian(self._excess[_BUSY, rows, col])
        median_step = _nanmedian(self._median_step[rows])
        if math.isfinite(ratio):
            episode.ratio = ratio
        if math.isfinite(cost):
            episode.cost_seconds = max(0.0, cost)
            episode.cost_fraction = episode.cost_seconds / median_step if median_step > 0 else 0.0

    def _refresh_active(self) -> None:
        if not self._active:
            return
        if len(self._active) <= 64:
            for episode in self._active.values():
                self._update(episode)
            return
        # Many flags (a whole slow node of a big job): one vectorised pass instead of one per flag.
        rows = self._recent_rows(self.config.lookback)
        median_step = _nanmedian(self._median_step[rows])
        own = [e for e in self._active.values() if e.cause is not Cause.LINK]
        # A rank that stopped reporting has only NaN here until its flag clears: nanmedian warns, quietly.
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            if own:
                cols = [e.column for e in own]
                ratios = np.nanmedian(self._ratio[np.ix_(rows, cols)], axis=0)
                costs = np.nanmedian(self._excess[_BUSY][np.ix_(rows, cols)], axis=0)
                for episode, ratio, cost in zip(own, ratios.tolist(), costs.tolist(), strict=True):
                    if math.isfinite(ratio):
                        episode.ratio = ratio
                    if math.isfinite(cost):
                        episode.cost_seconds = max(0.0, cost)
                        episode.cost_fraction = episode.cost_seconds / median_step if median_step > 0 else 0.0
        for episode in self._active.values():
            if episode.cause is Cause.LINK:
                self._update(episode)

    def _mark_node_wide(self) -> None:
        """Set ``node_wide`` on flags whose every node-mate still reporting is flagged too."""
        reporting = self._last_seen[: len(self._ranks)] > self._count - self.config.lookback
        ranks_per_node = Counter(node for node, live in zip(self._node_of, reporting.tolist(), strict=True) if live)
        flagged_per_node = Counter(episode.node for episode in self._active.values())
        for episode in self._active.values():
            total = ranks_per_node.get(episode.node, 0)
            episode.node_wide = total > 1 and flagged_per_node[episode.node] >= total


def _grow_columns(array: npt.NDArray[Any], columns: int) -> npt.NDArray[Any]:
    """``array`` with NaN columns appended up to ``columns`` (no-op when it has as many)."""
    if array.shape[-1] >= columns:
        return array
    grown = np.full((*array.shape[:-1], columns), np.nan, dtype=array.dtype)
    grown[..., : array.shape[-1]] = array
    return grown
