"""How many intra-op threads a training step uses: one or all of torch's, as this machine
measured for a step of that shape and as other processes leave cores free, never more than
allowed.

A small step (the seed network: 333 rows, ~3.4 million multiply-adds) is made of tiny
kernels; a second thread splits each into halves too small to pay for the fork and the barrier
after it, and where another process holds a core (a grid search with ``n_jobs``, a shared
server) every barrier waits for it. Measured (``python bench/run.py --workload threads``, 2-core
Intel VM, float64): the seed step eager takes ~750 µs on one thread against ~910 µs on two;
compiled, ~570 µs against ~450 µs when the machine is quiet but ~450 µs against ~1080 µs beside
one busy process. Where more threads start to pay depends on the machine and the network, so no
one size fits: a 20-128-128-1 step (float32, batch 256, 14.6 M multiply-adds, compiled) took
~390 µs on one thread and ~300 µs on two on a 2-core AMD EPYC (1.7-4.5x slower on two beside
one busy process), but 342 µs on one and 858 µs on 16 on a 16-core Xeon.

So ``threads="auto"`` (``auto_threads``) runs a CPU step

- below ``MEASURED_WORK[0]`` (1 M) multiply-adds on one thread, nothing measured;
- beside other processes that hold cores torch's threads would need (a look at the run
  queue, ~1-5 ms) on one thread, or for a step of ``MEASURED_WORK[1]`` (128 M) or more on the
  cores left free;
- otherwise from 128 M on torch's threads, and in between on them only where this machine
  measured the step's eager kernels clearly (15%) faster on them than on one: measured once
  per machine and step shape (network, rows, members, thread count), ~10-100 ms at the first
  step of that shape, and cached on disk (``fnmlp.train._calibration``).

``FNMLP_THREAD_CALIBRATION=0`` measures and looks at nothing: a step below ``SERIAL_WORK``
runs on one thread, a larger one on torch's threads (the rule before measuring). torch's
threads are ``torch.get_num_threads()``, which ``OMP_NUM_THREADS``, ``threadpoolctl`` and
joblib's workers already limit: fnmlp only ever lowers the count. The count is chosen at a
step shape's first step (load that starts later is not seen), set for each step's duration
and put back after it (~1 µs a step, bookkeeping included), so code around a step keeps its own;
``threads=None`` leaves it alone. Setting it is safe beside other Python threads (other fits,
the caller's own torch code): a step's count is its own whatever they do, and every thread's
count is what it was after the steps (``fnmlp.train._thread_scopes``).
"""

from __future__ import annotations

import numbers

import torch

from fnmlp.nn import Linear
from fnmlp.train import _calibration
from fnmlp.train._thread_scopes import IntraOpThreads

SERIAL_WORK = 16_000_000  # one thread below, where nothing is measured (calibration off)
MEASURED_WORK = (1_000_000, 128_000_000)  # one thread below, all from the top, measured between


def step_work(model, rows: int, members: int = 1) -> int:
    """Multiply-adds of one training step: the forward and the two backward products of every
    ``Linear`` over ``rows`` rows (of each of ``members`` networks stepped together)."""
    products = sum(n_in * layer.out_features(n_in)
                   for layer, n_in in zip(model.layers, model.widths) if isinstance(layer, Linear))
    return 3 * members * rows * products


def choose_threads(threads, model, rows: int, members: int = 1,
                   device: torch.device | None = None) -> int:
    """The intra-op thread count for a step of ``model`` over ``rows`` rows (``members``
    networks at once): ``threads`` when a count (at most torch's current count), for
    ``"auto"`` one or torch's count as measured here (``auto_threads``; torch's count for a
    step on another device than the CPU), for None torch's count (left alone)."""
    available = torch.get_num_threads()
    if threads is None:
        return available
    if threads != "auto":
        return min(int(threads), available)
    if available == 1 or (device is not None and device.type != "cpu"):
        return available
    return auto_threads(model, rows, members, available)[0]


def auto_threads(model, rows: int, members: int, available: int) -> tuple[int, str]:
    """``(count, why)`` for a CPU step: one thread below ``MEASURED_WORK[0]`` multiply-adds,
    ``available`` from ``MEASURED_WORK[1]``, in between ``available`` only where this machine
    measured them clearly faster; never more than the cores other processes leave free (one
    in between). With ``FNMLP_THREAD_CALIBRATION=0``: one below ``SERIAL_WORK``, else all."""
    work = step_work(model, rows, members)
    if work < MEASURED_WORK[0]:
        return 1, f"below {MEASURED_WORK[0] / 1e6:.0f} M: too small for threads"
    if not _calibration.calibrating():
        serial = work < SERIAL_WORK
        return (1 if serial else available, f"{'below' if serial else 'from'} "
                f"{SERIAL_WORK / 1e6:.0f} M, not measured (FNMLP_THREAD_CALIBRATION=0)")
    large = work >= MEASURED_WORK[1]
    free = _calibration.free_cores()
    if free is not None and free < available:
        return (max(1, free) if large else 1,
                f"other processes hold cores that {available} threads would need")
    if large:
        return available, f"from {MEASURED_WORK[1] / 1e6:.0f} M: large enough for threads"
    return _measured_threads(model, rows, members, available)


def _measured_threads(model, rows: int, members: int, available: int) -> tuple[int, str]:
    """``(count, why)`` by this machine's measured gain of ``available`` threads over one."""
    gain = _calibration.thread_gain(model, rows, members, available)
    if gain.value is None:
        return 1, f"not measured: {_NOT_MEASURED.get(gain.origin, gain.origin)}"
    verdict = "" if gain.clear else f", under {_calibration.MARGIN:.2f}x"
    return (available if gain.clear else 1,
            f"{available} threads measured {gain.value:.2f}x as fast as one here{verdict}")


_NOT_MEASURED = {"busy": "the machine was too busy", "failed": "the step could not run"}


def describe_threads(threads, model, rows: int) -> str:
    """What ``choose_threads`` picks for steps of ``rows`` rows, and why (``fit``'s verbose)."""
    if threads is None:
        count = torch.get_num_threads()
        return f"{count} thread{'s' if count > 1 else ''} (threads=None: torch's count, left alone)"
    if threads != "auto":
        count = choose_threads(threads, model, rows)
        return f"{count} thread{'s' if count > 1 else ''} (threads={threads})"
    available = torch.get_num_threads()
    if available == 1:
        return "1 thread (auto: torch's thread count is 1)"
    count, why = auto_threads(model, rows, 1, available)
    work = step_work(model, rows)
    return (f"{count} thread{'s' if count > 1 else ''} (auto: {work / 1e6:.1f} M multiply-adds "
            f"per step, {why})")


def check_threads(threads) -> None:
    """Refuse anything but ``"auto"``, None (leave torch's count alone) or a positive int."""
    if threads is None or (isinstance(threads, str) and threads == "auto"):
        return
    if isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or threads < 1:
        raise ValueError(f"threads must be 'auto', None or a positive int, got {threads!r}")


class StepThreads:
    """The thread count of one step's calls (``threads``: ``"auto"``, a count, or None to leave
    torch's alone), chosen once per (rows, torch's current count, device): ``with
    step_threads(rows, device) as count: ...`` runs the block on ``count`` threads (this
    thread's count set for it and put back after it; ``fnmlp.train._thread_scopes``)."""

    def __init__(self, threads, model, members: int = 1):
        check_threads(threads)
        self.threads, self.model, self.members = threads, model, members
        self._scopes: dict[tuple, IntraOpThreads] = {}

    def __call__(self, rows: int, device: torch.device) -> IntraOpThreads:
        current = torch.get_num_threads()
        where = (rows, current, device)
        scope = self._scopes.get(where)
        if scope is None:
            count = choose_threads(self.threads, self.model, rows, self.members, device)
            scope = self._scopes[where] = IntraOpThreads(count, current)
        return scope

    def pin(self, extras: dict, rows: int, device: torch.device) -> None:
        """Make "auto" one count for a whole fit, kept in ``extras`` (the run's, saved with
        its checkpoints): a resumed fit computes on the thread count of the fit it continues,
        whatever the load now (a compiled step's sums can depend on the count)."""
        if self.threads != "auto" or device.type != "cpu":
            return
        count = extras.get("threads")
        if count is None:
            count = choose_threads("auto", self.model, rows, self.members, device)
        extras["threads"] = self.threads = int(count)
        self._scopes.clear()
