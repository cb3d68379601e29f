"""Resumable, observable fits: checkpoints every N epochs, resume after SIGKILL bit-identical to
an uninterrupted fit (shuffling and dropout included), early stopping, callbacks, progress."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import fnmlp
from helpers import leaves

F64 = torch.float64
ROOT = Path(__file__).resolve().parents[2]

SETUP = """
import torch, fnmlp
model = fnmlp.MLP(6, [fnmlp.Dense(16, "relu", dropout=0.2), fnmlp.BatchNorm(), fnmlp.Dense(3)])
params = model.init(torch.Generator().manual_seed(0), dtype=torch.float64)
g = torch.Generator().manual_seed(1)
x = torch.randn(600, 6, generator=g, dtype=torch.float64)
y = torch.randn(600, 3, generator=g, dtype=torch.float64)
optimizer = fnmlp.adam(1e-3)
kwargs = dict(epochs=30, batch_size=8, optimizer=optimizer, shuffle=True, valid=(x[:100], y[:100]))
"""


def _setup():
    names: dict = {}
    exec(SETUP, names)  # the same model, data and settings as the killed subprocess
    return names


@pytest.mark.slow
def test_a_killed_fit_resumes_bit_identical_to_an_uninterrupted_one(tmp_path):
    path = tmp_path / "run.fnmlp"
    script = SETUP + textwrap.dedent(f"""
        fnmlp.fit(model, params, x, y, generator=torch.Generator().manual_seed(5),
                  checkpoint={str(path)!r}, checkpoint_every=2, resume=True, **kwargs)
    """)
    child = subprocess.Popen([sys.executable, "-c", script],
                             env=dict(os.environ, PYTHONPATH=str(ROOT)))
    deadline = time.monotonic() + 120
    while not path.exists() and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.01)
    time.sleep(random.Random(0).uniform(0.1, 0.6))  # somewhere in a later epoch
    child.send_signal(signal.SIGKILL)
    child.wait()
    saved = fnmlp.load(path).metadata["fnmlp_fit"]
    assert 0 < saved["epoch"] < 30, saved["epoch"]  # killed in the middle of the fit
    names = _setup()
    resumed = fnmlp.fit(names["model"], names["params"], names["x"], names["y"],
                        generator=torch.Generator().manual_seed(5), checkpoint=path,
                        resume=True, **names["kwargs"])
    names = _setup()
    whole = fnmlp.fit(names["model"], names["params"], names["x"], names["y"],
                      generator=torch.Generator().manual_seed(5), **names["kwargs"])
    assert resumed.history == whole.history
    assert all(torch.equal(a, b) for a, b in zip(
        leaves((resumed.params, resumed.state, resumed.opt_state)),
        leaves((whole.params, whole.state, whole.opt_state))))


def _regression(seed=0):
    model = fnmlp.MLP(4, [fnmlp.Dense(8, "tanh"), fnmlp.Dense(2)])
    params = model.init(torch.Generator().manual_seed(seed), dtype=F64)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(64, 4, generator=g, dtype=F64)
    y = x[:, :2] * 2 + 0.1 * torch.randn(64, 2, generator=g, dtype=F64)
    return model, params, x, y


def test_early_stopping_restores_the_best_parameters():
    model, params, x, y = _regression()
    kwargs = dict(batch_size=16, optimizer=fnmlp.sgd(0.5), valid=(x[:16] + 1, y[:16]))
    full = fnmlp.fit(model, params, x, y, epochs=40, **kwargs)
    stopped = fnmlp.fit(model, params, x, y, epochs=40, patience=3, restore_best=True,
                        **kwargs)
    losses = full.history.valid_loss
    best = min(range(len(losses)), key=lambda e: (losses[e], e))
    assert len(stopped.history.valid_loss) < 40  # it stopped early
    assert stopped.history.valid_loss == losses[:len(stopped.history.valid_loss)]
    assert min(stopped.history.valid_loss) == losses[best] or best >= len(
        stopped.history.valid_loss)
    evaluated = model.evaluate(stopped.params, x[:16] + 1, y[:16])
    assert evaluated == min(stopped.history.valid_loss)


def test_a_callback_sees_every_epoch_and_can_stop():
    model, params, x, y = _regression()
    seen = []

    def on_epoch_end(epoch, logs):
        seen.append((epoch, sorted(logs)))
        return epoch == 2

    result = fnmlp.fit(model, params, x, y, epochs=10, batch_size=16, optimizer=fnmlp.sgd(0.1),
                       valid=(x, y), on_epoch_end=on_epoch_end)
    assert seen == [(e, sorted(["epoch", "train_loss", "valid_loss", "lr", "epoch_time",
                                "samples_per_s"])) for e in range(3)]
    assert len(result.history.train_loss) == 3


def test_progress_bar_shows_the_epochs_and_losses(capsys):
    model, params, x, y = _regression()
    fnmlp.fit(model, params, x, y, epochs=3, batch_size=16, optimizer=fnmlp.sgd(0.1),
              valid=(x, y), progress=True)
    err = capsys.readouterr().err
    assert "3/3" in err and "loss=" in err and "valid=" in err
    fnmlp.fit(model, params, x, y, epochs=3, batch_size=16, optimizer=fnmlp.sgd(0.1))
    assert capsys.readouterr().err == ""  # not a terminal: no bar unless asked


def test_a_non_finite_loss_leaves_a_checkpoint_of_the_last_finite_state(tmp_path):
    model, params, x, y = _regression()
    path = tmp_path / "run.fnmlp"
    with pytest.raises(fnmlp.NonFiniteLossError):
        fnmlp.fit(model, params, x * 1e3, y * 1e6, epochs=50, batch_size=8,
                  optimizer=fnmlp.sgd(1e3), checkpoint=path)
    saved = fnmlp.load(path)
    assert all(torch.isfinite(t).all() for t in leaves(saved.params))


def test_resume_without_a_checkpoint_starts_afresh_and_checks_what_it_resumes(tmp_path):
    model, params, x, y = _regression()
    path = tmp_path / "run.fnmlp"
    kwargs = dict(epochs=3, batch_size=16, optimizer=fnmlp.sgd(0.1))
    fresh = fnmlp.fit(model, params, x, y, checkpoint=path, resume=True, **kwargs)
    assert fresh.history == fnmlp.fit(model, params, x, y, **kwargs).history
    again = fnmlp.fit(model, params, x, y, checkpoint=path, resume=True, **kwargs)
    assert again.history == fresh.history  # finished already: nothing more to do
    other = fnmlp.MLP(4, [fnmlp.Dense(9, "tanh"), fnmlp.Dense(2)])
    with pytest.raises(ValueError, match="holds a fit of another model"):
        fnmlp.fit(other, other.init(dtype=F64), x, y, checkpoint=path, resume=True, **kwargs)
    with pytest.raises(ValueError, match="another optimizer"):
        fnmlp.fit(model, params, x, y, checkpoint=path, resume=True, epochs=3, batch_size=16,
                  optimizer=fnmlp.adam(0.1))


@pytest.mark.parametrize("overrides, error, message", [
    (dict(resume=True), ValueError, "resume=True needs checkpoint="),
    (dict(patience=2), ValueError, "pass valid="),
    (dict(checkpoint_every=0, checkpoint="x"), ValueError, "checkpoint_every must be"),
    (dict(checkpoint=3), TypeError, "checkpoint must be a file path"),
    (dict(on_epoch_end="stop"), TypeError, "on_epoch_end must be callable"),
    (dict(min_delta=-1.0), ValueError, "min_delta must be"),
])
def test_bad_run_options_are_named(overrides, error, message):
    model, params, x, y = _regression()
    with pytest.raises(error, match=message):
        fnmlp.fit(model, params, x, y, epochs=1, batch_size=16, optimizer=fnmlp.sgd(0.1),
                  **overrides)


def test_an_overflow_in_an_epochs_last_step_is_caught_and_checkpointed_apart(tmp_path):
    model = fnmlp.MLP(2, [fnmlp.Linear(1)])  # float32: one update by 1e36 overflows
    params = model.init(torch.Generator().manual_seed(0))
    x, y = torch.ones(4, 2), torch.full((4, 1), 1e3)
    path = tmp_path / "run.fnmlp"
    with pytest.raises(fnmlp.NonFiniteLossError, match="last step of epoch 0.*run.fnmlp.nonfinite"
                       ) as info:
        fnmlp.fit(model, params, x, y, epochs=3, batch_size=4, optimizer=fnmlp.sgd(1e36),
                  checkpoint=path)
    assert all(torch.isfinite(t).all() for t in leaves(info.value.params))
    assert int(info.value.opt_state.step) == 0  # stepped back before the overflowing update
    assert not path.exists()  # no epoch ended finite; the last finite state is kept apart
    saved = fnmlp.load(f"{path}.nonfinite")
    assert all(torch.isfinite(t).all() for t in leaves(saved.params))


def test_a_resume_checks_its_settings_and_keeps_the_best_parameters(tmp_path):
    model, params, x, y = _regression()
    path = tmp_path / "run.fnmlp"
    kwargs = dict(batch_size=16, optimizer=fnmlp.sgd(0.5), valid=(x[:16] + 1, y[:16]))
    whole = fnmlp.fit(model, params, x, y, epochs=12, restore_best=True, **kwargs)
    fnmlp.fit(model, params, x, y, epochs=6, checkpoint=path, **kwargs)  # no restore_best
    resumed = fnmlp.fit(model, params, x, y, epochs=12, checkpoint=path, resume=True,
                        restore_best=True, **kwargs)
    assert resumed.history == whole.history
    assert all(torch.equal(a, b) for a, b in zip(leaves(resumed.params), leaves(whole.params)))
    with pytest.raises(ValueError, match="batch_size=16, this one has 8"):
        fnmlp.fit(model, params, x, y, epochs=12, checkpoint=path, resume=True,
                  **{**kwargs, "batch_size": 8})
    with pytest.raises(ValueError, match="at epoch 12, past epochs=5"):
        fnmlp.fit(model, params, x, y, epochs=5, checkpoint=path, resume=True, **kwargs)


def test_a_fit_stopped_by_its_callback_can_be_resumed(tmp_path):
    model, params, x, y = _regression()
    path = tmp_path / "run.fnmlp"
    kwargs = dict(epochs=6, batch_size=16, optimizer=fnmlp.sgd(0.1), checkpoint=path,
                  resume=True)
    first = fnmlp.fit(model, params, x, y, on_epoch_end=lambda epoch, logs: epoch == 1, **kwargs)
    rest = fnmlp.fit(model, params, x, y, **kwargs)
    whole = fnmlp.fit(model, params, x, y, epochs=6, batch_size=16, optimizer=fnmlp.sgd(0.1))
    assert len(first.history.train_loss) == 2 and rest.history == whole.history


@pytest.mark.slow
def test_early_stopping_and_callbacks_work_with_the_compiled_step(tmp_path):
    model, params, x, y = _regression(seed=3)
    kwargs = dict(epochs=40, batch_size=16, optimizer=fnmlp.sgd(0.5), valid=(x[:16] + 1, y[:16]),
                  patience=3, restore_best=True, on_epoch_end=lambda epoch, logs: epoch == 30)
    eager = fnmlp.fit(model, params, x, y, **kwargs)
    compiled = fnmlp.fit(model, params, x, y, compile=True, checkpoint=tmp_path / "c.fnmlp",
                         **kwargs)
    assert len(compiled.history.valid_loss) == len(eager.history.valid_loss) < 40
    assert max(abs(a - b) / abs(b) for a, b in zip(compiled.history.valid_loss,
                                                   eager.history.valid_loss)) <= 1e-12
    assert max((a - b).abs().max().item() for a, b in zip(leaves(compiled.params),
                                                          leaves(eager.params))) <= 1e-12


def test_a_resume_on_other_data_is_refused_before_any_work(tmp_path):
    model, params, x, y = _regression()
    path = tmp_path / "run.fnmlp"
    kwargs = dict(epochs=3, batch_size=16, optimizer=fnmlp.sgd(0.1), checkpoint=path)
    fnmlp.fit(model, params, x, y, **kwargs)
    before = path.read_bytes()
    message = "holds a fit on other data \\(its fingerprint differs\\)"
    for other in [(x + 1, y), (x, y * 2), (x.flip(0), y.flip(0))]:  # the same row count
        with pytest.raises(ValueError, match=message):
            fnmlp.fit(model, params, *other, resume=True, **kwargs)
    with pytest.raises(ValueError, match=message):  # row weights are part of the data
        fnmlp.fit(model, params, x, y, sample_weight=torch.rand(len(x), dtype=F64),
                  resume=True, **{**kwargs, "epochs": 4})
    assert path.read_bytes() == before  # nothing trained, nothing written
    same = fnmlp.fit(model, params, x.clone(), y.clone(), resume=True, **kwargs)
    assert same.history == fnmlp.fit(model, params, x, y, **kwargs).history


def test_a_resume_checks_the_validation_data_and_an_ensembles_data(tmp_path):
    model, params, x, y = _regression()
    path = tmp_path / "run.fnmlp"
    kwargs = dict(epochs=2, batch_size=16, optimizer=fnmlp.sgd(0.1), checkpoint=path)
    fnmlp.fit(model, params, x, y, valid=(x[:8], y[:8]), **kwargs)
    with pytest.raises(ValueError, match="fit on other data"):
        fnmlp.fit(model, params, x, y, valid=(x[8:16], y[8:16]), resume=True, **kwargs)
    ensemble = fnmlp.Ensemble(model, size=2)
    stacked = ensemble.init(torch.Generator().manual_seed(0), dtype=F64)
    other = tmp_path / "ensemble.fnmlp"
    ensemble.fit(stacked, x, y, epochs=2, batch_size=16, optimizer=fnmlp.sgd(0.1),
                 checkpoint=other)
    with pytest.raises(ValueError, match="fit on other data"):
        ensemble.fit(stacked, x + 1, y, epochs=3, batch_size=16, optimizer=fnmlp.sgd(0.1),
                     checkpoint=other, resume=True)


def test_a_checkpoint_without_a_data_fingerprint_still_resumes(tmp_path):
    model, params, x, y = _regression()
    path = tmp_path / "run.fnmlp"
    kwargs = dict(batch_size=16, optimizer=fnmlp.sgd(0.1), checkpoint=path)
    fnmlp.fit(model, params, x, y, epochs=2, **kwargs)
    saved = fnmlp.load(path)
    del saved.metadata["fnmlp_fit"]["settings"]["data"]  # as an older fnmlp wrote it
    fnmlp.save(path, model, saved.params, state=saved.state, opt_state=saved.opt_state,
               optimizer=saved.optimizer, metadata=saved.metadata, extra=saved.extra)
    resumed = fnmlp.fit(model, params, x, y, epochs=4, resume=True, **kwargs)
    assert len(resumed.history.train_loss) == 4
    assert "data" in fnmlp.load(path).metadata["fnmlp_fit"]["settings"]  # stored from now on


def test_resuming_a_file_of_fnmlp_save_or_another_optimizer_says_what_differs(tmp_path):
    model, params, x, y = _regression()
    path = tmp_path / "saved.fnmlp"
    fnmlp.save(path, model, params)
    kwargs = dict(epochs=2, batch_size=16, checkpoint=path, resume=True)
    with pytest.raises(ValueError, match="holds no fit to resume: it was written by "
                                         "fnmlp.save, not by a checkpointed fit"):
        fnmlp.fit(model, params, x, y, optimizer=fnmlp.sgd(0.1), **kwargs)
    run = tmp_path / "run.fnmlp"
    fnmlp.fit(model, params, x, y, epochs=1, batch_size=16, optimizer=fnmlp.sgd(0.1),
              checkpoint=run)
    with pytest.raises(ValueError, match=r"another optimizer: SGD\(lr=0.1.*this fit's is "
                                         r"SGD\(lr=0.2.*\(lr differs: 0.1 there, 0.2 here\)"):
        fnmlp.fit(model, params, x, y, optimizer=fnmlp.sgd(0.2), **{**kwargs, "checkpoint": run})


class _Killed(Exception):
    pass


def _kill_after(at):
    """An ``on_epoch_end`` that ends the fit with an exception after epoch ``at``."""

    def on_epoch_end(epoch, logs):
        if epoch == at:
            raise _Killed(epoch)

    return on_epoch_end


@pytest.mark.parametrize("members", [None, 3])
def test_a_resumed_fits_lr_and_metrics_history_equals_an_uninterrupted_ones(tmp_path, members):
    model, params, x, y = _regression()
    fit = fnmlp.fit
    if members is not None:
        ensemble = fnmlp.Ensemble(model, members)
        model, params = ensemble, ensemble.init(torch.Generator().manual_seed(0), dtype=F64)
    path = tmp_path / "run.fnmlp"

    def run(**extra):
        return fit(model, params, x, y, epochs=6, batch_size=16, shuffle=True,
                   generator=torch.Generator().manual_seed(3),
                   optimizer=fnmlp.adam(fnmlp.schedules.cosine(0.02, total_steps=24)),
                   valid=(x[:16] + 0.5, y[:16]),
                   metrics={"r2": fnmlp.metrics.r2, "mse": fnmlp.metrics.mean_squared_error},
                   compile=False, **extra)

    whole = run()
    with pytest.raises(_Killed):  # checkpoints after epochs 1 and 3; killed after epoch 4
        run(checkpoint=path, checkpoint_every=2, resume=True, on_epoch_end=_kill_after(4))
    assert fnmlp.load(path).metadata["fnmlp_fit"]["epoch"] == 4
    resumed = run(checkpoint=path, checkpoint_every=2, resume=True)
    assert resumed.history == whole.history
    assert len(whole.history.lr) == 6 and len(set(map(str, whole.history.lr))) == 6
    assert sorted(whole.history.metrics) == ["mse", "r2", "valid_mse", "valid_r2"]
    assert all(len(values) == 6 for values in whole.history.metrics.values())


def test_a_non_finite_loss_error_carries_the_lr_and_metrics_of_the_epochs_it_keeps(tmp_path):
    model, params, x, y = _regression()
    with pytest.raises(fnmlp.NonFiniteLossError) as info:
        fnmlp.fit(model, params, x * 1e3, y * 1e6, epochs=50, batch_size=8,
                  optimizer=fnmlp.sgd(1e3), metrics={"mse": fnmlp.metrics.mean_squared_error})
    history = info.value.history
    assert len(history.lr) == len(history.metrics["mse"]) == len(history.train_loss)

    # the parameters overflow in epoch 2's last (only) step: that epoch is undone, its lr and
    # metrics too, in the error's history and in the .nonfinite checkpoint
    model = fnmlp.MLP(2, [fnmlp.Linear(1)])  # float32: one update by 1e36 overflows
    params = model.init(torch.Generator().manual_seed(0))
    x, y = torch.ones(4, 2), torch.full((4, 1), 1e3)
    path = tmp_path / "run.fnmlp"

    class Raise(fnmlp.callbacks.Callback):
        def on_epoch_end(self, epoch, logs):
            if epoch == 1:
                self.trainer.learning_rate = 1e36

    with pytest.raises(fnmlp.NonFiniteLossError, match="last step of epoch 2") as info:
        fnmlp.fit(model, params, x, y, epochs=4, batch_size=4, optimizer=fnmlp.sgd(1e-3),
                  metrics={"mse": fnmlp.metrics.mean_squared_error}, callbacks=[Raise()],
                  checkpoint=path)
    history = info.value.history
    assert len(history.train_loss) == len(history.lr) == len(history.metrics["mse"]) == 2
    kept = fnmlp.load(f"{path}.nonfinite").metadata["fnmlp_fit"]
    assert len(kept["extras"]["history"]["lr"]) == len(kept["train_loss"]) == 2
