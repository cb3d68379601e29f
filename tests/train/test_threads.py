"""Fits run with the thread limits their caller sets: threadpoolctl's limits and joblib's
workers (as GridSearchCV(n_jobs=...) starts them) are never oversubscribed."""

import joblib
import pytest
import torch
from threadpoolctl import threadpool_limits

import fnmlp


def threads_during_fit() -> list[int]:
    """torch's intra-op thread count seen at each epoch's end of a small fit."""
    model = fnmlp.MLP(4, [fnmlp.Dense(8, "relu"), fnmlp.Linear(1)])
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 4, generator=g), torch.randn(64, 1, generator=g)
    seen = []
    fnmlp.fit(model, model.init(g), x, y, epochs=2, batch_size=16, optimizer=fnmlp.sgd(0.1),
              on_epoch_end=lambda epoch, logs: seen.append(torch.get_num_threads()))
    return seen


def test_a_fit_keeps_threadpoolctl_limits():
    before = torch.get_num_threads()
    with threadpool_limits(1):
        assert threads_during_fit() == [1, 1]
    assert torch.get_num_threads() == before  # fnmlp changes no thread setting


@pytest.mark.slow
def test_fits_in_joblib_workers_use_the_workers_thread_limit():
    seen = joblib.Parallel(n_jobs=2)(joblib.delayed(threads_during_fit)() for _ in range(2))
    assert seen == [[1, 1], [1, 1]]


# --- the thread count per step size (train_step(threads="auto")) ------------------------------


@pytest.fixture
def measured(monkeypatch, tmp_path):
    """``threads="auto"``'s measurement faked: ``measured.gain`` is what every step shape
    measures (``measured.calls``: the thread counts asked for), ``measured.free`` the cores
    other processes leave (None: cannot tell); the cache in the test's folder, nothing
    remembered after."""
    from fnmlp.train import _calibration

    class Fake:
        gain, free, calls = 1.0, None, []

    def measure(step, threads):
        Fake.calls.append(threads)
        return Fake.gain

    monkeypatch.setenv("FNMLP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("FNMLP_THREAD_CALIBRATION", raising=False)
    monkeypatch.setattr(_calibration, "measure_gain", measure)
    monkeypatch.setattr(_calibration, "free_cores", lambda: Fake.free)
    Fake.calls = []
    _calibration.forget()
    yield Fake
    _calibration.forget()


def seen_by_steps(monkeypatch, model=None, **options) -> list[int]:
    """torch's thread count inside each eager step of a 3-step loop, and the loop's own."""
    from fnmlp.train import _step

    seen, make = [], _step.network_step

    def recording(*args, **kwargs):
        step = make(*args, **kwargs)

        def counted(*inputs):
            seen.append(torch.get_num_threads())
            return step(*inputs)
        return counted

    monkeypatch.setattr(_step, "network_step", recording)
    model = model or fnmlp.MLP(6, [fnmlp.Dense(32, "tanh"), fnmlp.Linear(3)])
    g = torch.Generator().manual_seed(0)
    params = model.init(g, dtype=torch.float64)
    x, y = torch.randn(333, 6, generator=g, dtype=torch.float64), torch.randn(
        333, 3, generator=g, dtype=torch.float64)
    optimizer = fnmlp.sgd(0.01)
    step = fnmlp.train_step(model, fnmlp.mse, optimizer, compile=False, **options)
    state = optimizer.init(params)
    for _ in range(3):
        params, state, _ = step(params, state, x, y)
        seen.append(("after", torch.get_num_threads()))
    return seen


def test_a_small_step_runs_on_one_thread_and_puts_the_count_back(two_threads, monkeypatch):
    assert seen_by_steps(monkeypatch) == [1, ("after", 2)] * 3


def test_an_explicit_thread_count_is_used_but_never_raised(two_threads, monkeypatch):
    assert seen_by_steps(monkeypatch, threads=2) == [2, ("after", 2)] * 3
    torch.set_num_threads(1)
    monkeypatch.undo()
    assert seen_by_steps(monkeypatch, threads=2) == [1, ("after", 1)] * 3


SEED = fnmlp.MLP(6, [fnmlp.Dense(32, "tanh")] * 4 + [fnmlp.Linear(3)])
WIDE = fnmlp.MLP(256, [fnmlp.Dense(1024, "relu")] * 3 + [fnmlp.Linear(16)])


def test_the_thread_count_follows_the_step_size(two_threads, measured):
    from fnmlp.train._threads import MEASURED_WORK, SERIAL_WORK, choose_threads, step_work

    assert step_work(SEED, 333) == 3 * 333 * (6 * 32 + 3 * 32 * 32 + 32 * 3)
    assert MEASURED_WORK[0] < step_work(SEED, 333) < SERIAL_WORK
    assert SERIAL_WORK < MEASURED_WORK[1] <= step_work(WIDE, 1024)
    tiny = fnmlp.MLP(6, [fnmlp.Dense(32, "tanh"), fnmlp.Linear(3)])
    assert choose_threads("auto", tiny, 333) == 1  # too small to measure
    assert choose_threads("auto", WIDE, 1024) == 2  # large enough not to
    assert measured.calls == []
    measured.gain = 3.0
    assert choose_threads("auto", SEED, 333) == 2  # measured in between
    assert choose_threads("auto", SEED, 333, members=32) == 2  # an ensemble's step
    assert measured.calls == [2, 2]
    assert choose_threads(4, SEED, 333) == 2  # never more than torch's count


def test_all_threads_only_where_they_are_clearly_faster(two_threads, measured):
    from fnmlp.train._calibration import MARGIN
    from fnmlp.train._threads import choose_threads

    for gain, expected in [(0.5, 1), (1.0, 1), (MARGIN - 0.01, 1), (MARGIN, 2), (1.4, 2)]:
        measured.gain = gain
        assert choose_threads("auto", SEED, 333 + len(measured.calls)) == expected  # new rows
    assert measured.calls == [2] * 5


def test_a_step_shape_is_measured_once_per_machine(two_threads, measured, tmp_path):
    from fnmlp.train import _calibration
    from fnmlp.train._threads import choose_threads

    measured.gain = 1.4
    assert choose_threads("auto", SEED, 333) == 2
    assert choose_threads("auto", SEED, 333) == 2
    _calibration.forget()  # as a new process on this machine: from the cache file
    measured.gain = 0.5  # would say otherwise
    assert choose_threads("auto", SEED, 333) == 2
    assert measured.calls == [2]
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_beside_busy_processes_a_step_keeps_one_thread(measured):
    from fnmlp.train._threads import choose_threads, describe_threads

    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        measured.gain, measured.free = 1.4, 3  # another process holds one of 4 cores
        assert choose_threads("auto", SEED, 333) == 1
        assert measured.calls == []  # nothing measured under load
        assert choose_threads("auto", WIDE, 1024) == 3  # a large step: the free cores
        measured.free = 0
        assert choose_threads("auto", WIDE, 1024) == 1
        assert choose_threads(4, WIDE, 1024) == 4  # a count is the caller's
        assert describe_threads("auto", SEED, 333) == (
            "1 thread (auto: 3.4 M multiply-adds per step, other processes hold cores that 4 "
            "threads would need)")
        measured.free = 4
        assert choose_threads("auto", SEED, 333) == 4 and measured.calls == [4]
    finally:
        torch.set_num_threads(before)


def test_without_a_measurement_the_fixed_rule_or_one_thread(two_threads, measured,
                                                           monkeypatch):
    from fnmlp.train._threads import choose_threads, describe_threads

    medium = fnmlp.MLP(20, [fnmlp.Dense(192, "relu"), fnmlp.Dense(192, "relu"),
                            fnmlp.Linear(1)])  # 31 M multiply-adds at 256 rows
    measured.gain = None  # gave up: the machine was too busy
    assert choose_threads("auto", medium, 256) == 1
    assert describe_threads("auto", medium, 256).endswith("not measured: the machine was "
                                                          "too busy)")
    monkeypatch.setenv("FNMLP_THREAD_CALIBRATION", "0")  # the fixed rule, as before
    measured.calls.clear()
    measured.free = 0  # not even looked at
    assert choose_threads("auto", medium, 256) == 2 and choose_threads("auto", SEED, 333) == 1
    assert describe_threads("auto", SEED, 333) == (
        "1 thread (auto: 3.4 M multiply-adds per step, below 16 M, not measured "
        "(FNMLP_THREAD_CALIBRATION=0))")
    assert measured.calls == []


def test_a_measured_choice_is_the_steps_and_the_count_put_back(two_threads, measured,
                                                              monkeypatch):
    measured.gain = 1.4
    seed = fnmlp.MLP(6, [fnmlp.Dense(32, "tanh")] * 4 + [fnmlp.Linear(3)])
    assert seen_by_steps(monkeypatch, seed) == [2, ("after", 2)] * 3
    assert measured.calls == [2]  # once, at the first step


def test_describe_says_what_was_measured(two_threads, measured):
    from fnmlp.train._threads import describe_threads

    measured.gain = 1.4
    assert describe_threads("auto", SEED, 333) == (
        "2 threads (auto: 3.4 M multiply-adds per step, 2 threads measured 1.40x as fast as "
        "one here)")
    measured.gain = 1.1
    assert describe_threads("auto", SEED, 100) == (
        "1 thread (auto: 1.0 M multiply-adds per step, 2 threads measured 1.10x as fast as one "
        "here, under 1.15x)")
    assert describe_threads(1, SEED, 333) == "1 thread (threads=1)"
    torch.set_num_threads(1)
    assert describe_threads("auto", SEED, 333) == "1 thread (auto: torch's thread count is 1)"


def test_the_step_restores_the_thread_count_when_it_raises(two_threads, monkeypatch):
    from fnmlp.train import _step

    def failing(*args, **kwargs):
        def step(*inputs):
            raise RuntimeError("boom")
        return step

    monkeypatch.setattr(_step, "network_step", failing)
    model = fnmlp.MLP(2, [fnmlp.Linear(1)])
    params = model.init(torch.Generator().manual_seed(0))
    optimizer = fnmlp.sgd(0.1)
    step = fnmlp.train_step(model, fnmlp.mse, optimizer, compile=False)
    with pytest.raises(RuntimeError, match="boom"):
        step(params, optimizer.init(params), torch.ones(4, 2), torch.ones(4, 1))
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "two", "Auto"])
def test_a_bad_thread_count_is_refused_before_any_work(bad):
    model = fnmlp.MLP(2, [fnmlp.Linear(1)])
    params = model.init(torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="threads must be 'auto', None or a positive int"):
        fnmlp.train_step(model, fnmlp.mse, fnmlp.sgd(0.1), compile=False, threads=bad)
    with pytest.raises(ValueError, match="threads must be 'auto', None or a positive int"):
        fnmlp.fit(model, params, torch.ones(4, 2), torch.ones(4, 1), epochs=1, batch_size=2,
                  optimizer=fnmlp.sgd(0.1), threads=bad)


def test_one_thread_and_two_give_the_same_eager_step(two_threads):
    model = fnmlp.MLP(6, [fnmlp.Dense(32, "tanh"), fnmlp.Dense(32, "softmax"),
                          fnmlp.Linear(3)])
    g = torch.Generator().manual_seed(0)
    params = model.init(g, dtype=torch.float64)
    x, y = torch.randn(333, 6, generator=g, dtype=torch.float64), torch.randn(
        333, 3, generator=g, dtype=torch.float64)
    optimizer = fnmlp.sgd(0.01)
    results = []
    for threads in (1, 2):
        step = fnmlp.train_step(model, fnmlp.mse, optimizer, compile=False, threads=threads)
        results.append(step(params, optimizer.init(params), x, y))
    for one, two in zip(*(torch.utils._pytree.tree_leaves(r) for r in results)):
        torch.testing.assert_close(one, two, rtol=1e-13, atol=0)


def test_verbose_fit_says_how_many_threads(capsys, two_threads):
    model = fnmlp.MLP(4, [fnmlp.Dense(8, "relu"), fnmlp.Linear(1)])
    g = torch.Generator().manual_seed(0)
    fnmlp.fit(model, model.init(g), torch.randn(64, 4, generator=g),
              torch.randn(64, 1, generator=g), epochs=1, batch_size=16,
              optimizer=fnmlp.sgd(0.1), verbose=True, compile=False)
    assert ("eager steps (compile=False); 1 thread (auto: 0.0 M multiply-adds per step, below "
            "1 M: too small for threads)") in capsys.readouterr().out


def test_numpy_thread_counts_are_accepted():
    import numpy as np

    from fnmlp.train._threads import check_threads, choose_threads

    check_threads(np.int64(1))
    assert choose_threads(np.int64(1), fnmlp.MLP(2, [fnmlp.Linear(1)]), 4) == 1


def test_a_step_off_the_cpu_keeps_torchs_thread_count(two_threads, measured):
    from fnmlp.train._threads import choose_threads

    assert choose_threads("auto", SEED, 333, device=torch.device("cuda")) == 2
    assert choose_threads(1, SEED, 333, device=torch.device("cuda")) == 1
    assert choose_threads("auto", SEED, 333, device=torch.device("cpu")) == 1
    assert measured.calls == [2]  # only the CPU step measured


# --- denormals flushed inside a compiled CPU step on one thread --------------------------------


def test_the_flush_mode_is_scoped_and_a_callers_mode_kept():
    from fnmlp.train._denormals import flushed_denormals, flushing

    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush denormals")
    assert not flushing()
    with flushed_denormals():
        assert flushing()
    assert not flushing()
    with flushed_denormals(enabled=False):
        assert not flushing()
    torch.set_flush_denormal(True)  # the caller's own mode
    try:
        with flushed_denormals():
            assert flushing()
        assert flushing()
    finally:
        torch.set_flush_denormal(False)


def test_a_compiled_step_on_one_thread_flushes_denormals_the_eager_step_never(monkeypatch):
    from fnmlp.train import _compile
    from fnmlp.train._denormals import flushing
    from fnmlp.train.engine import EAGER
    from fnmlp.train._step import network_step

    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush denormals")
    model = fnmlp.MLP(3, [fnmlp.Dense(4, "tanh"), fnmlp.Linear(2)])
    g = torch.Generator().manual_seed(0)
    params, optimizer = model.init(g), fnmlp.sgd(0.1)
    x, y = torch.randn(8, 3, generator=g), torch.randn(8, 2, generator=g)
    seen = []

    def compile_graph(function, args, **options):
        """Stands in for the compiler: the graph records the mode and runs eagerly."""
        def graph(*inputs):
            seen.append(flushing())
            return function(*inputs)
        return graph

    monkeypatch.setattr(_compile, "compile_graph", compile_graph)
    for options, expected in [({"threads": 1}, True), ({"threads": 1, "flush_denormals": False},
                                                       False)]:
        step = fnmlp.train_step(model, fnmlp.mse, optimizer, compile=True, **options)
        step.executor.graphs = _compile.Graphs()  # not the shared cache
        step(params, optimizer.init(params), x, y)
        assert seen.pop() is expected and not flushing()
    eager = fnmlp.train_step(model, fnmlp.mse, optimizer, compile=False, threads=1)
    real = network_step(model, fnmlp.mse, optimizer, 0.0, EAGER)

    def recording(carry, *data):
        seen.append(flushing())
        return real(carry, *data)

    eager.executor._eager.clear()
    eager.executor.make = lambda kernels, layout: recording
    eager(params, optimizer.init(params), x, y)
    assert seen == [False]


def test_a_fit_keeps_its_thread_count_in_its_checkpoints_and_a_resume_uses_it(
        tmp_path, monkeypatch):
    """"auto" is chosen once per fit and saved with the run: a resumed fit steps on the count
    the interrupted fit chose, whatever a new choice would say (a compiled step's sums can
    depend on it)."""
    if torch.get_num_threads() < 2:
        pytest.skip("needs torch to have 2 threads")
    from fnmlp.train import _threads
    from helpers import small_regression

    model, params, x, y = small_regression()
    path = tmp_path / "run.fnmlp"
    options = dict(batch_size=8, optimizer=fnmlp.sgd(0.1), compile=False, checkpoint=path)
    monkeypatch.setattr(_threads, "auto_threads", lambda *args: (1, "chosen by the test"))
    fnmlp.fit(model, params, x, y, epochs=2, **options)
    assert fnmlp.load(path).metadata["fnmlp_fit"]["extras"]["threads"] == 1
    monkeypatch.setattr(_threads, "auto_threads",
                        lambda *args: (torch.get_num_threads(), "chosen by the test"))
    counts, set_threads = [], torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads",
                        lambda count: (counts.append(count), set_threads(count)))
    fnmlp.fit(model, params, x, y, epochs=4, resume=True, **options)
    assert counts and counts[0] == 1  # every step set to 1, and put back after it
    counts.clear()
    fnmlp.fit(model, params, x, y, epochs=1, **{**options, "checkpoint": tmp_path / "new"})
    assert counts == []  # a new fit chose torch's count: nothing set
