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
