"""Setting torch's intra-op thread count for a block safely beside other Python threads.

What ``torch.set_num_threads`` changes (measured on torch 2.13's OpenMP backend, the one of
PyTorch's builds; its native backend refuses a change once parallel work started): the calling
thread's own count (OpenMP's per-thread ``nthreads-var``, MKL's thread-local setting), which
no other thread sees, **and** a process-wide default that a thread takes at its first parallel
work (its first ``torch.get_num_threads()`` or kernel). So a step in one thread never changes
the count another, already started thread computes with; but a thread that starts its torch
work while a step of another thread has lowered the count keeps that lowered count for good,
and what it "puts back" after its own steps is that count.

So every fnmlp block that changes the count (``IntraOpThreads``: a step, a timing of the
thread calibration) is registered in one process-wide table, and ``settle_thread`` (called by
fit and ``train_step``'s entry points) lets a thread that fnmlp has not seen yet take its
count only while no other thread has one changed: it waits for the open blocks to close (new
ones wait for it meanwhile, so it is not starved; ``SETTLE_S`` at most) and starts the
thread's count there, at torch's default. A step's count is thus its own choice whatever
other threads do, and every thread's count, and torch's default, is what it was once the
steps end. Costs: ~1 µs per step that changes the count (a lock taken twice); a new thread's
first fit may wait for another thread's step to end (a compile: seconds).

Not covered: a thread of the caller's own that starts its torch work during an fnmlp step of
another thread inherits the step's count, as it would inherit any ``torch.set_num_threads``;
start it before, or set its count (``torch.set_num_threads``) first.
"""

from __future__ import annotations

import threading
import time

import torch

SETTLE_S = 300.0  # a new thread waits at most this long for other threads' steps to end

_LOCK = threading.Lock()  # the bookkeeping's (taken directly on the fast path: ~0.1 µs)
_CONDITION = threading.Condition(_LOCK)  # waits for it
_OPEN: dict[int, int] = {}  # thread ident -> blocks open in it that changed its count
_SETTLING = [0]  # threads waiting in ``settle_thread`` (new blocks wait for them)
_LOCAL = threading.local()  # .settled: this thread's count was started by ``settle_thread``


class IntraOpThreads:
    """torch's intra-op thread count at ``count`` in this thread for the block, then back to
    ``current`` (the thread's count before it); ``with ... as count``. Nothing is set where
    the two are equal. Stateless, so one object serves every call (and thread)."""

    __slots__ = ("count", "current")

    def __init__(self, count: int, current: int):
        self.count, self.current = count, current

    def __enter__(self) -> int:
        if self.count != self.current:
            enter_scope(self.count, self.current)
        return self.count

    def __exit__(self, *exc_info) -> None:
        if self.count != self.current:
            exit_scope(self.current)


def enter_scope(count: int, current: int) -> None:
    """Register a block of this thread that sets its count to ``count`` (from ``current``),
    after any thread waiting in ``settle_thread``, and set it. An interruption (``Keyboard
    Interrupt``) at any point leaves nothing registered or set."""
    ident, registered = threading.get_ident(), False
    try:
        with _LOCK:
            if _SETTLING[0] and not _OPEN.get(ident):  # a nested block must not wait
                while _SETTLING[0]:
                    _CONDITION.wait()
            _OPEN[ident] = _OPEN.get(ident, 0) + 1
            registered = True
        torch.set_num_threads(count)
    except BaseException:
        if registered:
            exit_scope(current)
        raise


def exit_scope(current: int) -> None:
    """Put this thread's count back to ``current`` and close its block (the last one closed
    wakes the threads waiting in ``settle_thread``)."""
    try:
        torch.set_num_threads(current)
    finally:
        ident = threading.get_ident()
        with _LOCK:
            left = _OPEN.get(ident, 0) - 1
            if left > 0:
                _OPEN[ident] = left
            else:
                _OPEN.pop(ident, None)
            if _SETTLING[0] and not _OPEN:
                _CONDITION.notify_all()


def open_elsewhere() -> int:
    """Blocks that other threads have open now (a count of theirs changed)."""
    ident = threading.get_ident()
    with _LOCK:
        return sum(n for other, n in _OPEN.items() if other != ident)


def settle_thread(timeout: float = SETTLE_S) -> None:
    """Start this thread's torch thread count at torch's default, not at a count another
    thread's step has set meanwhile: the first time fnmlp runs in a thread, wait until no
    other thread has a block open (at most ``timeout`` s), then let torch start the count.
    A no-op in a thread seen before (~0.1 µs); a thread whose torch work started earlier
    keeps the count it has."""
    if getattr(_LOCAL, "settled", False):
        return
    ident = threading.get_ident()
    with _CONDITION:
        _SETTLING[0] += 1
        try:
            deadline = time.monotonic() + timeout
            while any(other != ident for other in _OPEN):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                _CONDITION.wait(left)
            torch.get_num_threads()  # torch starts this thread's count now (if not before)
        finally:
            _SETTLING[0] -= 1
            _CONDITION.notify_all()
    _LOCAL.settled = True
