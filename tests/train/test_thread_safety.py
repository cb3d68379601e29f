"""Fits in several Python threads at once: each step runs on its own fit's thread count
whatever the other threads do, the results are bit-identical to the same fits run one after
the other, and every thread's count (and torch's default for new threads) is what it was
(``fnmlp.train._thread_scopes``)."""

from __future__ import annotations

import collections
import threading
import time

import pytest
import torch
from torch.utils._pytree import tree_leaves

import fnmlp
from fnmlp.train import _thread_scopes


@pytest.fixture
def two_threads():
    """torch at 2 intra-op threads (this thread's and the default) for the test, put back
    after it; nothing left open by fnmlp."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)
    assert _thread_scopes._OPEN == {} and _thread_scopes._SETTLING == [0]


def fresh_thread_count() -> int:
    """The count a thread that starts now takes (torch's process-wide default)."""
    seen = []
    worker = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    worker.start()
    worker.join()
    return seen[0]


class Recorder:
    """Per thread name, the thread counts seen inside each step (and, compiled, the count the
    graph was chosen for); ``started`` is set once ``names`` have all stepped."""

    def __init__(self, names):
        self.names, self.seen = set(names), collections.defaultdict(list)
        self.started = threading.Event()

    def record(self, *counts) -> None:
        name = threading.current_thread().name
        self.seen[name].append(counts)
        if self.names <= set(self.seen):
            self.started.set()


def record_eager_steps(monkeypatch, recorder: Recorder) -> None:
    """Every eager network step records torch's count as it runs."""
    from fnmlp.train import _step

    make = _step.network_step

    def recording(*args, **kwargs):
        step = make(*args, **kwargs)

        def counted(*inputs):
            recorder.record(torch.get_num_threads())
            return step(*inputs)
        return counted

    monkeypatch.setattr(_step, "network_step", recording)


def record_compiled_steps(monkeypatch, recorder: Recorder) -> None:
    """Every compiled call records the count its graph is chosen for and torch's count."""
    from fnmlp.train._executor import Executor

    run = Executor._run_compiled

    def recording(self, carry, steps, rows, pad_to, device, threads, *, chunk):
        recorder.record(threads, torch.get_num_threads())
        return run(self, carry, steps, rows, pad_to, device, threads, chunk=chunk)

    monkeypatch.setattr(Executor, "_run_compiled", recording)


def problem(width: int, rows: int, features: int = 6):
    model = fnmlp.MLP(features, [fnmlp.Dense(width, "tanh"), fnmlp.Dense(width, "softmax"),
                                 fnmlp.Linear(3)])
    g = torch.Generator().manual_seed(width)
    return (model, model.init(g), torch.randn(rows, features, generator=g),
            torch.randn(rows, 3, generator=g))


def run_fits(jobs: dict, together: bool, noise: Recorder | None = None) -> dict:
    """Run each ``jobs[name]()`` in a thread of that name, all at once (``together``) or one
    after the other; with ``noise``, a thread keeps changing its own count (and so torch's
    default) between 1 and 2 while they run, from when they have all stepped."""
    results, errors = {}, []

    def target(name):
        try:
            results[name] = jobs[name]()
        except BaseException as error:  # noqa: BLE001 - reported by the test
            errors.append(error)

    workers = [threading.Thread(target=target, args=(name,), name=name) for name in jobs]
    stop, noisy = threading.Event(), None
    if noise is not None:
        noisy = threading.Thread(target=toggle_counts, args=(noise.started, stop))
        noisy.start()
    for worker in workers:
        worker.start()
        if not together:
            worker.join()
    for worker in workers:
        worker.join()
    stop.set()
    if noisy is not None:
        noisy.join()
    assert not errors, errors
    return results


def toggle_counts(started: threading.Event, stop: threading.Event) -> None:
    """The caller's own torch code: its thread's count changed again and again."""
    before = torch.get_num_threads()
    started.wait(30)
    while not stop.is_set():
        for count in (1, 2):
            torch.set_num_threads(count)
            torch.ones(64, 64).sum()
    torch.set_num_threads(before)


def assert_same(first, second) -> None:
    for a, b in zip(tree_leaves(first.params), tree_leaves(second.params)):
        assert torch.equal(a, b)
    assert first.history.train_loss == second.history.train_loss


def fit_jobs(compile: bool, width: int, rows: int, batch_size: int, epochs: int) -> dict:
    """Two fits of different networks on 1 and on 2 threads."""
    jobs = {}
    for name, threads, grown in (("fit-1", 1, 0), ("fit-2", 2, 1)):
        model, params, x, y = problem(width + grown, rows)
        jobs[name] = (lambda model=model, params=params, x=x, y=y, threads=threads:
                      fnmlp.fit(model, params, x, y, epochs=epochs, batch_size=batch_size,
                                optimizer=fnmlp.sgd(0.1), compile=compile, threads=threads,
                                steps_per_call=1, shuffle=True,
                                generator=torch.Generator().manual_seed(threads)))
    return jobs


def assert_own_counts(recorder: Recorder) -> None:
    """Each fit's steps ran on its own count only ("fit-N" on N threads)."""
    for name in recorder.names:
        count = int(name.split("-")[1])
        assert recorder.seen[name] and {c for seen in recorder.seen[name] for c in seen} == {
            count}, (name, set(recorder.seen[name]))



def assert_together_as_alone(jobs, recorder, alone) -> None:
    """The fits run together (beside a thread flipping its count): each step on its own
    count, and each fit bit-identical to it run alone."""
    recorder.seen.clear()
    recorder.started.clear()
    together = run_fits(jobs, together=True, noise=recorder)
    assert_own_counts(recorder)
    for name in jobs:
        assert_same(together[name], alone[name])

def test_two_eager_fits_in_two_threads_match_the_fits_one_after_the_other(two_threads,
                                                                          monkeypatch):
    jobs = fit_jobs(compile=False, width=96, rows=1024, batch_size=128, epochs=6)
    recorder = Recorder(jobs)
    record_eager_steps(monkeypatch, recorder)
    alone = run_fits(jobs, together=False)
    assert_own_counts(recorder)
    for _ in range(2):
        assert_together_as_alone(jobs, recorder, alone)
    assert torch.get_num_threads() == 2 and fresh_thread_count() == 2


@pytest.mark.slow
def test_two_compiled_fits_in_two_threads_match_the_fits_one_after_the_other(two_threads,
                                                                             monkeypatch):
    """Compiled, on 1 and 2 threads: one after the other (compiling), then together with the
    graphs shared through the cache, then together compiling both at once."""
    from fnmlp.train import _compile

    jobs = fit_jobs(compile=True, width=8, rows=64, batch_size=8, epochs=40)
    recorder = Recorder(jobs)
    record_compiled_steps(monkeypatch, recorder)
    alone = run_fits(jobs, together=False)
    assert_own_counts(recorder)
    for shared in (True, False):
        if not shared:  # an empty cache: both fits compile at once
            monkeypatch.setattr(_compile, "_SHARED", collections.OrderedDict())
        assert_together_as_alone(jobs, recorder, alone)
    assert torch.get_num_threads() == 2 and fresh_thread_count() == 2


def test_a_new_threads_fit_waits_for_a_step_that_lowered_the_count(two_threads, monkeypatch):
    """A thread started while another thread's step holds a lowered count would take that count
    for good (torch's default follows the last ``set_num_threads``); a fit's thread waits for
    the step to end and starts at torch's default."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("torch's count is per thread (with a default for new ones) with OpenMP")
    jobs = fit_jobs(compile=False, width=32, rows=256, batch_size=64, epochs=2)
    del jobs["fit-1"]
    recorder = Recorder(jobs)
    record_eager_steps(monkeypatch, recorder)
    alone = run_fits(jobs, together=False)
    recorder.seen.clear()
    results = {}
    with _thread_scopes.IntraOpThreads(1, 2):  # another thread's step, lowered to 1
        assert fresh_thread_count() == 1  # what torch gives a thread started now
        worker = threading.Thread(target=lambda: results.update(done=jobs["fit-2"]()),
                                  name="fit-2")
        worker.start()
        time.sleep(0.3)
        assert not recorder.seen  # still waiting for the step to end
    worker.join()
    assert_own_counts(recorder)
    assert_same(results["done"], alone["fit-2"])
    assert fresh_thread_count() == 2


def test_threads_none_leaves_the_count_alone(two_threads, monkeypatch):
    from fnmlp.train._threads import check_threads, choose_threads, describe_threads

    check_threads(None)
    model, params, x, y = problem(8, 64)
    assert choose_threads(None, model, 64) == 2
    assert describe_threads(None, model, 64) == "2 threads (threads=None: torch's count, left " \
                                                 "alone)"
    counts, set_threads = [], torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads",
                        lambda count: (counts.append(count), set_threads(count)))
    recorder = Recorder(["MainThread"])
    record_eager_steps(monkeypatch, recorder)
    options = dict(epochs=2, batch_size=8, optimizer=fnmlp.sgd(0.1), compile=False)
    fnmlp.fit(model, params, x, y, threads=None, **options)
    step = fnmlp.train_step(model, fnmlp.mse, fnmlp.sgd(0.1), compile=False, threads=None)
    step(params, fnmlp.sgd(0.1).init(params), x, y)
    ensemble = fnmlp.Ensemble(model, size=2)
    ensemble.fit(ensemble.init(torch.Generator().manual_seed(0)), x, y, threads=None, **options)
    ensemble.train_step(fnmlp.mse, fnmlp.sgd(0.1), compile=False, threads=None)
    assert counts == []  # never set
    assert {seen for seen in recorder.seen["MainThread"]} == {(2,)}
    torch.set_num_threads(1)  # whatever it is, the steps keep it
    recorder.seen.clear()
    fnmlp.fit(model, params, x, y, threads=None, **options)
    assert {seen for seen in recorder.seen["MainThread"]} == {(1,)}


def test_an_interrupted_scope_leaves_nothing_open_and_the_count_back(two_threads, monkeypatch):
    set_threads, calls = torch.set_num_threads, []

    def interrupted(count):
        calls.append(count)
        if len(calls) == 1:
            raise KeyboardInterrupt
        set_threads(count)

    monkeypatch.setattr(torch, "set_num_threads", interrupted)
    with pytest.raises(KeyboardInterrupt):
        with _thread_scopes.IntraOpThreads(1, 2):
            pass
    assert calls == [1, 2] and _thread_scopes._OPEN == {}
    monkeypatch.undo()
    with pytest.raises(KeyboardInterrupt):
        with _thread_scopes.IntraOpThreads(1, 2):
            assert torch.get_num_threads() == 1
            with _thread_scopes.IntraOpThreads(2, 1):  # nested: no wait, back to 1 after
                assert _thread_scopes.open_elsewhere() == 0
            assert torch.get_num_threads() == 1
            raise KeyboardInterrupt
    assert torch.get_num_threads() == 2 and _thread_scopes._OPEN == {}
