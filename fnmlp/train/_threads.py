"""How many intra-op threads a training step uses: chosen per step size, never more than allowed.

A small step (the seed network: 333 rows, ~3.4 million multiply-adds) is made of tiny
kernels; a second thread splits each into halves too small to pay for the fork and the barrier
after it, and where another process holds a core (a grid search with ``n_jobs``, a shared
server) every barrier waits for it. Measured (``python bench/run.py --workload threads``, 2-core
CPU, float64): the seed step eager takes ~750 µs on one thread against ~910 µs on two; compiled,
~570 µs against ~450 µs when the machine is quiet but ~450 µs against ~1080 µs beside one busy
process. So a step below ``SERIAL_WORK`` multiply-adds runs on one thread; a larger step uses
the threads torch has (``torch.get_num_threads()``, which ``OMP_NUM_THREADS``,
``threadpoolctl`` and joblib's workers already limit): fnmlp only ever lowers the count.

The count is set for the step's duration and put back after it (``torch.set_num_threads`` is
process-wide; setting it costs ~0.3 µs), so code around a step keeps its own setting.
"""

from __future__ import annotations

import contextlib
import numbers

import torch

from fnmlp.nn import Linear

SERIAL_WORK = 16_000_000  # multiply-adds per step below which one thread is faster


def step_work(model, rows: int, members: int = 1) -> int:
    """Multiply-adds of one training step: the forward and the two backward products of every
    ``Linear`` over ``rows`` rows (of each of ``members`` networks stepped together)."""
    products = sum(n_in * layer.out_features(n_in)
                   for layer, n_in in zip(model.layers, model.widths) if isinstance(layer, Linear))
    return 3 * members * rows * products


def choose_threads(threads, model, rows: int, members: int = 1,
                   device: torch.device | None = None) -> int:
    """The intra-op thread count for a step of ``model`` over ``rows`` rows (``members``
    networks at once): ``threads`` when a count (at most torch's current count), or by the
    step's size for ``"auto"`` (torch's count for a step on another device than the CPU)."""
    available = torch.get_num_threads()
    if threads != "auto":
        return min(int(threads), available)
    if device is not None and device.type != "cpu":
        return available
    return 1 if step_work(model, rows, members) < SERIAL_WORK else available


def describe_threads(threads, model, rows: int) -> str:
    """What ``choose_threads`` picks for steps of ``rows`` rows, and why (``fit``'s verbose)."""
    count = choose_threads(threads, model, rows)
    plural = "s" if count > 1 else ""
    if threads != "auto":
        return f"{count} thread{plural} (threads={threads})"
    work = step_work(model, rows)
    return (f"{count} thread{plural} (auto: {work / 1e6:.1f} M multiply-adds per step "
            f"{'<' if work < SERIAL_WORK else '>='} {SERIAL_WORK / 1e6:.0f} M)")


def check_threads(threads) -> None:
    """Refuse anything but ``"auto"`` or a positive int."""
    if threads == "auto":
        return
    if isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or threads < 1:
        raise ValueError(f"threads must be 'auto' or a positive int, got {threads!r}")


class StepThreads:
    """The thread count of one step's calls (``threads``, ``"auto"`` or a count), chosen once
    per (rows, torch's current count, device): ``with step_threads(rows, device): ...``."""

    def __init__(self, threads, model, members: int = 1):
        check_threads(threads)
        self.threads, self.model, self.members = threads, model, members
        self._counts: dict[tuple, int] = {}

    def __call__(self, rows: int, device: torch.device):
        current = torch.get_num_threads()
        where = (rows, current, device)
        count = self._counts.get(where)
        if count is None:
            count = self._counts[where] = choose_threads(self.threads, self.model, rows,
                                                         self.members, device)
        return _UNCHANGED if count == current else _IntraOpThreads(count, current)


_UNCHANGED = contextlib.nullcontext()


class _IntraOpThreads:
    """torch's intra-op thread count set to ``count`` for the block, then back to ``current``
    (entered once per step: a class, no generator)."""

    def __init__(self, count: int, current: int):
        self.count, self.current = count, current

    def __enter__(self):
        torch.set_num_threads(self.count)
        return self

    def __exit__(self, *exc_info) -> None:
        torch.set_num_threads(self.current)
