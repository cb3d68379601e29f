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
def two_threads():
    """torch at 2 intra-op threads for the test, put back after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def seen_by_steps(monkeypatch, **options) -> list[int]:
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
    model = fnmlp.MLP(6, [fnmlp.Dense(32, "tanh"), fnmlp.Linear(3)])
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


def test_the_thread_count_follows_the_step_size(two_threads):
    from fnmlp.train._threads import SERIAL_WORK, choose_threads, step_work

    seed = fnmlp.MLP(6, [fnmlp.Dense(32, "tanh")] * 4 + [fnmlp.Linear(3)])
    wide = fnmlp.MLP(256, [fnmlp.Dense(1024, "relu")] * 3 + [fnmlp.Linear(16)])
    assert step_work(seed, 333) == 3 * 333 * (6 * 32 + 3 * 32 * 32 + 32 * 3)
    assert step_work(seed, 333) < SERIAL_WORK < step_work(wide, 1024)
    assert choose_threads("auto", seed, 333) == 1
    assert choose_threads("auto", wide, 1024) == 2
    assert choose_threads("auto", seed, 333, members=32) == 2  # an ensemble's step
    assert choose_threads(4, seed, 333) == 2  # never more than torch's count


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


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "two", None])
def test_a_bad_thread_count_is_refused_before_any_work(bad):
    model = fnmlp.MLP(2, [fnmlp.Linear(1)])
    params = model.init(torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="threads must be 'auto' or a positive int"):
        fnmlp.train_step(model, fnmlp.mse, fnmlp.sgd(0.1), compile=False, threads=bad)
    with pytest.raises(ValueError, match="threads must be 'auto' or a positive int"):
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
    assert "eager steps (compile=False); 1 thread (auto: 0.0 M multiply-adds per step < 16 M)" \
        in capsys.readouterr().out


def test_numpy_thread_counts_are_accepted():
    import numpy as np

    from fnmlp.train._threads import check_threads, choose_threads

    check_threads(np.int64(1))
    assert choose_threads(np.int64(1), fnmlp.MLP(2, [fnmlp.Linear(1)]), 4) == 1


def test_a_step_off_the_cpu_keeps_torchs_thread_count(two_threads):
    from fnmlp.train._threads import choose_threads

    seed = fnmlp.MLP(6, [fnmlp.Dense(32, "tanh")] * 4 + [fnmlp.Linear(3)])
    assert choose_threads("auto", seed, 333, device=torch.device("cuda")) == 2
    assert choose_threads(1, seed, 333, device=torch.device("cuda")) == 1
    assert choose_threads("auto", seed, 333, device=torch.device("cpu")) == 1


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
