"""How much faster a training step runs on all of torch's intra-op threads than on one, on this
machine: measured on the step's own eager kernels, once per machine and step shape, and cached;
and whether other processes hold cores right now.

Where more threads start to pay depends on the machine and on the network, not only on the
step's multiply-adds. Measured side by side on quiet machines (20-w-w-1 ReLU networks, float32,
batch 256, medians of 7 rounds, one run each; the compiled / eager step's time on one thread
over its time on all):

==============  =========  =========  =========  =========
work (M)           8.6       14.6       31.4       54.5
==============  =========  =========  =========  =========
AMD EPYC, 2     1.19/1.14  1.38/1.28  1.53/1.46  1.69/1.56
Xeon, 2 of 16   0.75/0.83  0.96/0.97  1.07/1.06  1.23/1.29
Xeon, 16        0.40/0.34  0.40/0.40  0.80/0.95  1.15/0.29
==============  =========  =========  =========  =========

The eager step's gain follows the compiled step's, mostly a little below it (so it errs
towards one thread), while a generic ladder of GEMM + elementwise steps timed the same way put
the crossover at ~2 M (AMD) and 8-10 M (Xeon, 16 threads): far too low for fnmlp's steps, whose
many small kernels each pay a fork and a barrier. So the measurement is the step's own:

- **what**: the network's eager forward, backward and SGD update (fnmlp's kernels, float32,
  random data; ``rows * members`` rows for an ensemble's step), on one thread and on the
  given count, the two interleaved, ``SAMPLES`` timings each; the gain is the ratio of the
  medians. float32 makes a step cheaper than float64 does, so a float64 step gains at least
  as much.
- **when**: at the first ``threads="auto"`` decision for a step of that shape whose size
  leaves the answer open (``fnmlp.train._threads``); ~10-100 ms, once per machine, network,
  rows and thread count.
- **under load**: beside a busy process every barrier of a multi-threaded step waits for the
  busy core (a 20-128-128-1 step: ~390 µs on one thread, 575-1760 µs on two beside one busy
  process, on the 2-core AMD), and a short measurement does not see it (the scheduler favours
  threads that slept: measured so, the step looked 1.36x faster on two). So nothing is
  measured while ``free_cores`` (a look at the run queue) says other processes hold cores,
  nor kept where they did by its end or it took over ``BUDGET_S``; medians, and ``MARGIN``
  (1.15): one thread is kept unless all are clearly faster.
- **cached** per machine: ``threads-<key>.json`` in ``$FNMLP_CACHE_DIR``, else
  ``$XDG_CACHE_HOME/fnmlp``, else ``~/.cache/fnmlp``; the key hashes the CPU model, the core
  count, torch's version and ``VERSION`` (this method's); the file maps (thread count, network,
  rows, members) to the gain, at most ``MAX_ENTRIES`` of them. A missing, unreadable or
  corrupt file is measured again (and rewritten where the folder is writable; an unwritable
  one costs a measurement per process, nothing else). Delete the file to measure again.
  ``FNMLP_THREAD_CALIBRATION=0`` measures nothing: callers use their fixed rule.

The thread count is set for each timing and put back after it, like a step's; the measurement
draws from its own generator and leaves torch's random state alone. The run-queue look reads
Linux's ``/proc`` (elsewhere it cannot tell, and nothing counts as busy); in a container it
sees the host's run queue, so a busy host counts as busy.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

import torch

from fnmlp.train._thread_scopes import IntraOpThreads

VERSION = 1  # of the method: a new one measures again
MARGIN = 1.15  # all threads must be this much faster than one (median against median)
SAMPLES = 7  # timings per thread count (their median counts)
SAMPLE_S = 200e-6  # a timing repeats the step for at least this long
BUDGET_S = 0.5  # a measurement not done by then gives up: the machine is busy
MAX_ENTRIES = 512  # gains kept in a cache file (the oldest dropped)
LOOKS = 5  # looks at the run queue per ``free_cores`` (~0.2-1 ms each)

Clock = Callable[[], float]


class Gain(NamedTuple):
    """A step's time on one thread over its time on all (None: not measured) and where that
    came from: ``"measured"`` (by this process), ``"cached"`` (by an earlier one), ``"off"``
    (``FNMLP_THREAD_CALIBRATION=0``), ``"busy"`` (not done within ``BUDGET_S``, or other
    processes held cores by its end: tried again at the next decision) or ``"failed"`` (the
    network's eager step raised)."""

    value: float | None
    origin: str

    @property
    def clear(self) -> bool:
        """All threads are clearly (``MARGIN``) faster than one."""
        return self.value is not None and self.value >= MARGIN


_LOCK = threading.Lock()
_MEMO: dict[tuple[int, str], Gain] = {}  # this process's gains by (threads, step key)


def thread_gain(model, rows: int, members: int, threads: int) -> Gain:
    """How much faster a step of ``model`` over ``rows`` rows (``members`` networks) runs on
    ``threads`` threads than on one, here: remembered, read from the cache, or measured now
    (and cached; a measurement that gave up is tried again at the next decision)."""
    where = (threads, step_key(model, rows, members))
    known = _MEMO.get(where)
    if known is not None:
        return known
    with _LOCK:
        known = _MEMO.get(where) or _calibrated(model, rows, members, threads, where[1])
        if known.origin != "busy":
            _MEMO[where] = known
        return known


def _calibrated(model, rows: int, members: int, threads: int, key: str) -> Gain:
    if not calibrating():
        return Gain(None, "off")
    identity = machine_identity()
    path = cache_path(identity)
    gains = read_cache(path, identity)
    entry = f"{threads}:{key}"
    if entry in gains:
        return Gain(gains[entry], "cached")
    try:
        gain = measure_gain(eager_step(model, rows * members), threads)
    except Exception:  # noqa: BLE001 - a network the synthetic step cannot run: not measured
        return Gain(None, "failed")
    if gain is None or busy(threads):  # load during the measurement: not this machine's own
        return Gain(None, "busy")
    gains.pop(entry, None)
    gains[entry] = gain
    write_cache(path, identity, dict(list(gains.items())[-MAX_ENTRIES:]))
    return Gain(gain, "measured")


def calibrating() -> bool:
    """Whether measuring is on (``FNMLP_THREAD_CALIBRATION`` is not 0, off, no or false)."""
    setting = os.environ.get("FNMLP_THREAD_CALIBRATION", "1").strip().lower()
    return setting not in ("0", "off", "no", "false")


def forget() -> None:
    """Drop this process's remembered gains (the cache file is kept)."""
    with _LOCK:
        _MEMO.clear()


def step_key(model, rows: int, members: int) -> str:
    """The cache's name for a step shape: the network's description, rows and members."""
    return hashlib.sha256(f"{model!r}|{rows}|{members}".encode()).hexdigest()[:16]


# --- the measurement --------------------------------------------------------------------------


def measure_gain(step: Callable[[], object], threads: int, clock: Clock = time.perf_counter,
                 budget_s: float = BUDGET_S, samples: int = SAMPLES) -> float | None:
    """``step``'s median time on one thread over its median time on ``threads``, the two
    timed in turn, ``samples`` times each (each count set for its timing and put back after
    it); None where ``budget_s`` of ``clock`` ran out first."""
    deadline = clock() + budget_s
    counts = (1, threads)
    repeats = [_repeats(step, count, clock) for count in counts]  # also warms up
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(samples):
        for count, repeat, seen in zip(counts, repeats, times):
            if clock() > deadline:
                return None
            seen.append(_timed(step, count, repeat, clock))
    if clock() > deadline:
        return None
    return statistics.median(times[0]) / statistics.median(times[1])


def _repeats(step: Callable[[], object], count: int, clock: Clock) -> int:
    """Calls per timing on ``count`` threads so that a timing lasts ``SAMPLE_S`` (after a
    first call that warms the thread pool and the caches)."""
    _timed(step, count, 1, clock)
    elapsed = _timed(step, count, 1, clock)
    return max(1, min(100, math.ceil(SAMPLE_S / max(elapsed, 1e-9))))


def _timed(step: Callable[[], object], count: int, repeat: int, clock: Clock) -> float:
    """Seconds per call of ``step`` over ``repeat`` calls on ``count`` threads."""
    with _threads_set(count):
        start = clock()
        for _ in range(repeat):
            step()
        return (clock() - start) / repeat


def _threads_set(count: int) -> IntraOpThreads:
    """This thread's count at ``count`` for a timing, put back after it (registered like a
    step's: ``fnmlp.train._thread_scopes``)."""
    return IntraOpThreads(count, torch.get_num_threads())


def eager_step(model, rows: int) -> Callable[[], None]:
    """A training step of ``model`` as fnmlp runs it eagerly (its forward and backward
    kernels, MSE, SGD's update), over ``rows`` random float32 rows; the same parameters every
    call (the update's result is dropped)."""
    from fnmlp.nn import dropout_key, mse, value_and_grad
    from fnmlp.optim import sgd

    g = torch.Generator().manual_seed(0)
    params = model.init(g)
    state = model.init_state()
    x = torch.randn(rows, model.in_features, generator=g)
    y = torch.randn(rows, model.out_features, generator=g)
    key = dropout_key(0, 0) if model.has_dropout else None
    optimizer = sgd(1e-4)
    opt_state = optimizer.init(params)

    def step() -> None:
        with torch.no_grad():
            _, grads, _ = value_and_grad(model, params, x, y, mse, state, key=key)
            optimizer.unchecked_update(params, grads, opt_state, fused=True)

    return step


# --- other processes ---------------------------------------------------------------------


def busy(threads: int) -> bool:
    """Whether other processes' threads hold cores that ``threads`` threads would need."""
    free = free_cores()
    return free is not None and free < threads


def free_cores() -> int | None:
    """The cores this process may use that other processes' threads do not hold now (by the
    median of ``LOOKS`` looks at the run queue); None where the system cannot tell (no
    ``/proc``)."""
    others = others_running()
    return None if others is None else max(0, usable_cores() - math.ceil(others))


def others_running(looks: int = LOOKS) -> float | None:
    """The median over ``looks`` of the threads of other processes running or ready to run
    (``/proc/loadavg``'s running count less this process's running threads); None where
    ``/proc`` cannot tell."""
    counts = []
    for _ in range(looks):
        seen = running_threads()
        if seen is None:
            return None
        counts.append(max(0, seen[0] - seen[1]))
    return statistics.median(counts)


def running_threads() -> tuple[int, int] | None:
    """``(all, own)``: the threads running or ready to run on the machine, and those of this
    process; None without Linux's ``/proc``."""
    try:
        with open("/proc/loadavg", encoding="ascii") as file:
            everyone = int(file.read().split()[3].split("/")[0])
        tasks = os.listdir("/proc/self/task")
    except (OSError, ValueError, IndexError):
        return None
    own = 0
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/stat", encoding="ascii", errors="replace") as f:
                stat = f.read()
        except OSError:  # the thread ended
            continue
        own += stat[stat.rfind(")") + 2:stat.rfind(")") + 3] == "R"
    return everyone, own


def usable_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# --- the cache --------------------------------------------------------------------------------


def cache_dir() -> str:
    """``$FNMLP_CACHE_DIR``, else ``$XDG_CACHE_HOME/fnmlp``, else ``~/.cache/fnmlp``."""
    own = os.environ.get("FNMLP_CACHE_DIR")
    if own:
        return os.path.abspath(own)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.abspath(os.path.join(base, "fnmlp"))


def machine_identity() -> dict:
    """What the gains depend on besides the step: the CPU model, the core count, torch and
    this method."""
    return {"cpu": cpu_model(), "cores": os.cpu_count() or 1, "torch": torch.__version__,
            "version": VERSION}


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as file:
            for line in file:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cache_path(identity: dict) -> str:
    """The cache file of the machine ``identity`` describes."""
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(cache_dir(), f"threads-{key}.json")


def read_cache(path: str, identity: dict) -> dict[str, float]:
    """The gains in ``path`` by ``"threads:step key"``, oldest first; empty where the file is
    missing, unreadable, corrupt or of another machine (a bad entry alone is skipped)."""
    try:
        with open(path, encoding="utf-8") as file:
            record = json.load(file)
        if record.get("machine") != identity:
            return {}
        return {str(k): float(v) for k, v in record["gains"].items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)
                and math.isfinite(v) and v > 0}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}


def write_cache(path: str, identity: dict, gains: dict[str, float]) -> bool:
    """Write ``gains`` to ``path`` (atomically: a reader sees the old file or the new one);
    False where it cannot be written."""
    record = {"machine": identity, "gains": gains}
    folder = os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=folder, prefix=".threads-", suffix=".tmp")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as file:
                json.dump(record, file, indent=1)
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
    except OSError:
        return False
    return True
