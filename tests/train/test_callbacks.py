"""Callbacks (``fnmlp.callbacks``): the hooks and the trainer, per-batch logs only when asked,
epoch logs and metrics, the verbose line, the writers, ``ReduceLROnPlateau`` against torch's,
and callback state across a kill and resume."""

import contextlib
import csv
import math
import os
import re
import sys
import warnings

import pytest
import torch

import fnmlp
from fnmlp.callbacks import Callback, CSVLogger, ReduceLROnPlateau, TensorBoard
from helpers import assert_exact_where_checked, exact_here, leaves

F64 = torch.float64
KEYS = ["epoch", "train_loss", "valid_loss", "lr", "epoch_time", "samples_per_s"]


def _regression(rows=64, seed=0):
    model = fnmlp.MLP(4, [fnmlp.Dense(8, "tanh"), fnmlp.Dense(2)])
    params = model.init(torch.Generator().manual_seed(seed), dtype=F64)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(rows, 4, generator=g, dtype=F64)
    y = x[:, :2] * 2 + 0.1 * torch.randn(rows, 2, generator=g, dtype=F64)
    return model, params, x, y


class Recorder(Callback):
    """Every hook call, with a copy of its logs."""

    def __init__(self):
        self.calls = []

    def on_train_begin(self, logs):
        self.calls.append(("begin", dict(logs), self.trainer.epoch, self.trainer.steps_done))

    def on_epoch_end(self, epoch, logs):
        self.calls.append(("epoch", epoch, dict(logs), self.trainer.learning_rate))

    def on_train_end(self, logs):
        self.calls.append(("end", dict(logs)))

    def epochs(self):
        return [call[2] for call in self.calls if call[0] == "epoch"]


class BatchRecorder(Callback):
    def __init__(self):
        self.batches = []

    def on_batch_end(self, batch, logs):
        self.batches.append(dict(logs))


class _Killed(Exception):
    pass


class Kill(Callback):
    """Ends the fit with an exception after epoch ``at`` (a kill between two epochs)."""

    def __init__(self, at):
        self.at = at

    def on_epoch_end(self, epoch, logs):
        if epoch == self.at:
            raise _Killed(epoch)


# --- hooks, trainer, logs ------------------------------------------------------------------


def test_hooks_run_in_order_with_the_trainer_and_the_epoch_logs():
    model, params, x, y = _regression()
    recorder = Recorder()
    result = fnmlp.fit(model, params, x, y, epochs=3, batch_size=16, optimizer=fnmlp.sgd(0.1),
                       valid=(x[:16], y[:16]), callbacks=[recorder], compile=False)
    begin, *epochs, end = recorder.calls
    assert begin == ("begin", {"epoch": 0, "epochs": 3, "steps_done": 0, "resumed": False}, 0,
                     0)
    assert [call[1] for call in epochs] == [0, 1, 2]
    for call, train, valid in zip(epochs, result.history.train_loss, result.history.valid_loss):
        logs = call[2]
        assert list(logs) == KEYS == list(recorder.trainer.log_keys)
        assert (logs["train_loss"], logs["valid_loss"], logs["lr"]) == (train, valid, 0.1)
        assert logs["epoch_time"] > 0 and logs["samples_per_s"] > 0
        assert call[3] == 0.1  # trainer.learning_rate: the base rate
    assert end[0] == "end" and end[1]["epochs_done"] == 3 and end[1]["steps_done"] == 12
    assert end[1]["error"] is None and end[1]["train_loss"] == result.history.train_loss[-1]
    trainer = recorder.trainer
    assert trainer.epoch == 2 and trainer.epochs == 3 and trainer.members == 1
    assert all(torch.equal(a, b) for a, b in zip(leaves(trainer.params), leaves(result.params)))


def test_a_callback_stops_the_fit_by_its_result_or_the_trainer_and_on_epoch_end_still_works():
    model, params, x, y = _regression()

    class StopByTrainer(Callback):
        def on_epoch_end(self, epoch, logs):
            if epoch == 1:
                self.trainer.stop_training = True

    kwargs = dict(epochs=10, batch_size=16, optimizer=fnmlp.sgd(0.1), compile=False)
    stopped = fnmlp.fit(model, params, x, y, callbacks=[StopByTrainer()], **kwargs)
    assert len(stopped.history.train_loss) == 2
    seen = []
    by_function = fnmlp.fit(model, params, x, y, callbacks=[Recorder()],
                            on_epoch_end=lambda epoch, logs: seen.append(logs) or epoch == 2,
                            **kwargs)
    assert len(by_function.history.train_loss) == 3 and list(seen[0]) == [
        k for k in KEYS if k != "valid_loss"]


def test_the_trainer_sets_the_learning_rate_in_the_state_for_the_next_epochs():
    model, params, x, y = _regression()

    class Halve(Callback):
        def on_epoch_end(self, epoch, logs):
            self.trainer.learning_rate = self.trainer.learning_rate / 2

    recorder = Recorder()
    result = fnmlp.fit(model, params, x, y, epochs=3, batch_size=16, optimizer=fnmlp.sgd(0.2),
                       callbacks=[recorder, Halve()], compile=False)
    assert [logs["lr"] for logs in recorder.epochs()] == [0.2, 0.1, 0.05]
    assert result.opt_state.learning_rate.item() == 0.025
    # the same as fitting epoch by epoch with the rate set in between
    optimizer, state, current = fnmlp.sgd(0.2), None, params
    for lr in [0.2, 0.1, 0.05]:
        state = optimizer.init(current) if state is None else optimizer.with_learning_rate(
            state, lr)
        part = fnmlp.fit(model, current, x, y, epochs=1, batch_size=16, optimizer=optimizer,
                         opt_state=state, compile=False)
        current, state = part.params, part.opt_state
    assert all(torch.equal(a, b) for a, b in zip(leaves(current), leaves(result.params)))


def test_batch_logs_come_only_when_a_callback_asks_and_with_chunks_after_each_chunk(monkeypatch):
    model, params, x, y = _regression(rows=60)
    optimizer = fnmlp.sgd(fnmlp.schedules.step_decay(0.1, step_size=1, gamma=0.5))
    kwargs = dict(epochs=2, batch_size=8, optimizer=optimizer, compile=False)
    reads = []
    original = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(1) or original(t))
    plain = fnmlp.fit(model, params, x, y, callbacks=[Callback()], **kwargs)
    assert len(reads) == 2 * 2  # per epoch: the losses and the rate, whatever the batches
    recorder = BatchRecorder()
    chunked = fnmlp.fit(model, params, x, y, callbacks=[recorder], steps_per_call=3, **kwargs)
    monkeypatch.undo()
    assert chunked.history == plain.history
    batches = recorder.batches
    assert [(b["epoch"], b["batch"]) for b in batches] == [(e, i) for e in range(2)
                                                           for i in range(8)]
    assert [b["rows"] for b in batches[:8]] == [8] * 7 + [4]
    assert [b["lr"] for b in batches] == [0.1 * 0.5 ** step for step in range(16)]
    means = [sum(b["loss"] for b in batches[8 * e:8 * e + 8]) / 8 for e in range(2)]
    assert means == pytest.approx(plain.history.train_loss, rel=1e-15)


def test_lr_in_the_logs_is_the_rate_of_the_next_update():
    model, params, x, y = _regression()
    optimizer = fnmlp.adam(fnmlp.schedules.cosine(0.01, total_steps=12))
    recorder = Recorder()
    result = fnmlp.fit(model, params, x, y, epochs=3, batch_size=16, optimizer=optimizer,
                       callbacks=[recorder], compile=False)
    rates = [logs["lr"] for logs in recorder.epochs()]
    assert rates == [optimizer.schedule(4 * (e + 1)).item() for e in range(3)]
    assert rates[-1] == optimizer.learning_rate(result.opt_state).item()


def test_metrics_are_evaluated_each_epoch_on_the_training_and_validation_data():
    model, params, x, y = _regression()
    recorder = Recorder()
    metrics = {"r2": fnmlp.metrics.r2, "mse": fnmlp.metrics.mean_squared_error}
    result = fnmlp.fit(model, params, x, y, epochs=2, batch_size=16, optimizer=fnmlp.sgd(0.1),
                       valid=(x[:16], y[:16]), metrics=metrics, callbacks=[recorder],
                       compile=False)
    logs = recorder.epochs()[-1]
    assert list(logs) == ["epoch", "train_loss", "valid_loss", "r2", "mse", "valid_r2",
                          "valid_mse", "lr", "epoch_time", "samples_per_s"]
    assert logs["r2"] == fnmlp.metrics.r2(model.apply(result.params, x), y)
    assert logs["valid_mse"] == fnmlp.metrics.mean_squared_error(
        model.apply(result.params, x[:16]), y[:16])
    assert logs["valid_mse"] == pytest.approx(logs["valid_loss"], rel=1e-12)


def test_the_history_keeps_each_epochs_lr_and_metrics_as_the_logs_held_them():
    model, params, x, y = _regression()
    recorder = Recorder()
    optimizer = fnmlp.adam(fnmlp.schedules.cosine(0.01, total_steps=12))  # a rate per epoch
    result = fnmlp.fit(model, params, x, y, epochs=3, batch_size=16, optimizer=optimizer,
                       valid=(x[:16], y[:16]), metrics={"r2": fnmlp.metrics.r2},
                       callbacks=[recorder], compile=False)
    logs = recorder.epochs()
    assert result.history.lr == [epoch["lr"] for epoch in logs] and len(set(result.history.lr)) == 3
    assert result.history.metrics == {name: [epoch[name] for epoch in logs]
                                      for name in ("r2", "valid_r2")}
    assert result.history.train_loss == [epoch["train_loss"] for epoch in logs]
    plain = fnmlp.fit(model, params, x, y, epochs=2, batch_size=16, optimizer=fnmlp.sgd(0.1),
                      compile=False)
    assert plain.history.metrics == {} and plain.history.lr == [0.1, 0.1]
    assert fnmlp.train.History().lr == [] and fnmlp.train.History([1.0], [2.0]).metrics == {}


def test_an_ensembles_history_keeps_each_members_lr_and_metrics():
    model, _, x, y = _regression()
    ensemble = fnmlp.Ensemble(model, 3)

    class Spread(Callback):
        def on_epoch_end(self, epoch, logs):
            if epoch == 0:
                self.trainer.learning_rate = [0.05, 0.1, 0.2]

    recorder = Recorder()
    result = fnmlp.fit(ensemble, ensemble.init(torch.Generator().manual_seed(0), dtype=F64),
                       x, y, epochs=3, batch_size=16, optimizer=fnmlp.sgd(0.1),
                       valid=(x[:16], y[:16]), metrics={"r2": fnmlp.metrics.r2},
                       callbacks=[recorder, Spread()], compile=False)
    logs = recorder.epochs()
    assert result.history.lr == [epoch["lr"] for epoch in logs]
    assert result.history.lr[1] == [0.05, 0.1, 0.2]
    assert result.history.metrics == {name: [epoch[name] for epoch in logs]
                                      for name in ("r2", "valid_r2")}
    assert all(len(values) == 3 for values in result.history.metrics["valid_r2"])
    plain = fnmlp.fit(ensemble, ensemble.init(torch.Generator().manual_seed(0), dtype=F64),
                      x, y, epochs=2, batch_size=16, optimizer=fnmlp.sgd(0.1), compile=False)
    assert plain.history.metrics == {} and plain.history.lr == [[0.1] * 3] * 2


@pytest.mark.parametrize("metrics, error, match", [
    ([fnmlp.metrics.r2], TypeError, "metrics must be a dict"),
    ({"r2": 3}, TypeError, r"metrics\['r2'\] must be a function"),
    ({"loss": fnmlp.metrics.r2}, ValueError, "'loss' is taken"),
    ({"valid_r2": fnmlp.metrics.r2}, ValueError, "'valid_r2' is taken"),
    ({"": fnmlp.metrics.r2}, TypeError, "non-empty strings"),
])
def test_bad_metrics_are_refused_before_any_work(metrics, error, match):
    model, params, x, y = _regression()
    recorder = BatchRecorder()
    with pytest.raises(error, match=match):
        fnmlp.fit(model, params, x, y, epochs=1, batch_size=16, optimizer=fnmlp.sgd(0.1),
                  metrics=metrics, callbacks=[recorder])
    assert recorder.trainer is None  # the fit never began


def test_a_metric_that_returns_no_number_is_named():
    model, params, x, y = _regression()
    with pytest.raises(TypeError, match="metric 'bad' returned"):
        fnmlp.fit(model, params, x, y, epochs=1, batch_size=16, optimizer=fnmlp.sgd(0.1),
                  metrics={"bad": lambda prediction, target: "high"})


@pytest.mark.parametrize("callbacks, error, match", [
    (Recorder(), TypeError, r"pass \[callback\]"),
    ([lambda epoch, logs: None], TypeError, r"callbacks\[0\] must be an fnmlp"),
    ("csv", TypeError, "callbacks must be a list"),
])
def test_bad_callbacks_are_refused(callbacks, error, match):
    model, params, x, y = _regression()
    with pytest.raises(error, match=match):
        fnmlp.fit(model, params, x, y, epochs=1, batch_size=16, optimizer=fnmlp.sgd(0.1),
                  callbacks=callbacks)
    twice = Recorder()
    with pytest.raises(ValueError, match="twice"):
        fnmlp.fit(model, params, x, y, epochs=1, batch_size=16, optimizer=fnmlp.sgd(0.1),
                  callbacks=[twice, twice])


def test_an_on_epoch_end_function_runs_even_when_it_is_falsy():
    model, params, x, y = _regression()
    seen = []

    class Falsy:  # a callable whose truth value is False (len 0)
        def __len__(self):
            return 0

        def __call__(self, epoch, logs):
            seen.append(epoch)

    fnmlp.fit(model, params, x, y, epochs=2, batch_size=16, optimizer=fnmlp.sgd(0.1),
              on_epoch_end=Falsy(), compile=False)
    assert seen == [0, 1]


class Checked(BatchRecorder):
    """Records its ``check`` calls."""

    def __init__(self):
        super().__init__()
        self.checks = []

    def check(self, log_keys, members):
        self.checks.append((list(log_keys), members))


def test_a_bad_configuration_is_refused_in_check_before_any_callback_begins(tmp_path):
    """``check`` runs for every callback before any work: a ``CSVLogger`` listed before a
    ``ReduceLROnPlateau`` without its monitor has not yet overwritten its file, and a
    checkpoint to resume is not read yet."""
    model, params, x, y = _regression()
    log = tmp_path / "log.csv"
    log.write_text("epoch,train_loss\n0,1.0\n")
    checked = Checked()
    with pytest.raises(ValueError, match=r"monitors 'valid_loss'.*needs valid="):
        fnmlp.fit(model, params, x, y, epochs=2, batch_size=16, optimizer=fnmlp.sgd(0.1),
                  callbacks=[checked, CSVLogger(log), ReduceLROnPlateau()], compile=False)
    assert log.read_text() == "epoch,train_loss\n0,1.0\n"  # untouched
    assert checked.checks == [([k for k in KEYS if k != "valid_loss"], 1)]
    assert checked.trainer is None and checked.batches == []
    damaged = tmp_path / "run.fnmlp"
    damaged.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="monitors 'r2'"):  # before the checkpoint is read
        fnmlp.fit(model, params, x, y, epochs=2, batch_size=16, optimizer=fnmlp.sgd(0.1),
                  callbacks=[CSVLogger(log), ReduceLROnPlateau(monitor="r2")],
                  checkpoint=damaged, resume=True, compile=False)
    assert log.read_text() == "epoch,train_loss\n0,1.0\n"
    ensemble = fnmlp.Ensemble(model, 3)
    checked = Checked()
    with pytest.raises(ValueError, match="min_lr has 2 values for 3 member"):
        fnmlp.fit(ensemble, ensemble.init(torch.Generator().manual_seed(0), dtype=F64), x, y,
                  epochs=1, batch_size=16, optimizer=fnmlp.sgd(0.1), valid=(x, y),
                  callbacks=[checked, CSVLogger(log), ReduceLROnPlateau(min_lr=[0.0, 0.1])])
    assert checked.checks == [(KEYS, 3)] and log.read_text() == "epoch,train_loss\n0,1.0\n"


def test_a_state_that_is_not_json_is_refused_before_the_first_step(tmp_path):
    model, params, x, y = _regression()

    class Opaque(BatchRecorder):
        def state_dict(self):
            return {"tensor": torch.zeros(1)}

    opaque = Opaque()
    with pytest.raises(TypeError, match="0:Opaque's state_dict"):
        fnmlp.fit(model, params, x, y, epochs=1, batch_size=16, optimizer=fnmlp.sgd(0.1),
                  callbacks=[opaque], checkpoint=tmp_path / "run.fnmlp")
    assert opaque.batches == []


def test_the_verbose_line_reads_well(capsys):
    model, params, x, y = _regression()
    fnmlp.fit(model, params, x, y, epochs=2, batch_size=16, optimizer=fnmlp.sgd(0.1),
              valid=(x[:16], y[:16]), metrics={"r2": fnmlp.metrics.r2}, verbose=True,
              compile=False)
    lines = [line for line in capsys.readouterr().out.splitlines()
             if line.startswith("epoch")]
    pattern = (r"epoch [12]/2  loss \d+\.\d{4}  valid_loss \d+\.\d{4}  r2 -?\d\.\d{4}  "
               r"valid_r2 -?\d\.\d{4}  lr 0\.1  \d+\.\d\d s  [\d,]+ samples/s")
    assert len(lines) == 2 and all(re.fullmatch(pattern, line) for line in lines), lines


def test_lead_only_callbacks_run_on_the_lead_process_only(tmp_path):
    from fnmlp.train.engine import CallbackRunner

    writer, watcher = CSVLogger(tmp_path / "log.csv"), Recorder()
    runner = CallbackRunner([writer, watcher], lead=False, optimizer=fnmlp.sgd(0.1), epochs=1,
                            log_keys=KEYS)
    assert [callback for _, callback in runner.callbacks] == [watcher]
    assert [key for key, _ in runner.callbacks] == ["1:Recorder"]  # keyed as on the lead
    assert not runner.batch_logs


# --- ensembles -------------------------------------------------------------------------------


def test_an_ensemble_logs_per_member_lists_and_its_trainer_sets_each_members_rate():
    model, _, x, y = _regression()
    ensemble = fnmlp.Ensemble(model, 3)
    params = ensemble.init(torch.Generator().manual_seed(0), dtype=F64)

    class Spread(Callback):
        def on_epoch_end(self, epoch, logs):
            if epoch == 0:
                self.trainer.learning_rate = [0.05, 0.1, 0.2]

    recorder, batches = Recorder(), BatchRecorder()
    result = fnmlp.fit(ensemble, params, x, y, epochs=2, batch_size=16,
                       optimizer=fnmlp.sgd(0.1), valid=(x[:16], y[:16]),
                       metrics={"r2": fnmlp.metrics.r2}, callbacks=[recorder, Spread(), batches],
                       compile=False)
    first, second = recorder.epochs()
    assert first["lr"] == [0.1] * 3 and second["lr"] == [0.05, 0.1, 0.2]
    assert second["train_loss"] == result.history.train_loss[-1]
    members = ensemble.apply(result.params, x)
    assert second["r2"] == [fnmlp.metrics.r2(members[k], y) for k in range(3)]
    assert len(batches.batches[0]["loss"]) == 3 and batches.batches[-1]["lr"] == [0.05, 0.1, 0.2]
    assert result.opt_state.learning_rate.tolist() == [0.05, 0.1, 0.2]


def test_an_ensemble_of_one_member_logs_lists_everywhere():
    model, _, x, y = _regression()
    ensemble = fnmlp.Ensemble(model, 1)
    recorder, batches = Recorder(), BatchRecorder()
    result = fnmlp.fit(ensemble, ensemble.init(torch.Generator().manual_seed(0), dtype=F64),
                       x, y, epochs=2, batch_size=16, optimizer=fnmlp.sgd(0.1),
                       valid=(x[:16], y[:16]), metrics={"r2": fnmlp.metrics.r2},
                       callbacks=[recorder, batches], compile=False)
    for call in recorder.calls[1:-1]:
        logs = call[2]
        assert all(isinstance(logs[key], list) and len(logs[key]) == 1
                   for key in ("train_loss", "valid_loss", "r2", "valid_r2", "lr"))
        assert call[3] == [0.1]  # trainer.learning_rate
    assert recorder.epochs()[-1]["train_loss"] == result.history.train_loss[-1]
    assert all(b["loss"] == [pytest.approx(b["loss"][0])] and b["lr"] == [0.1]
               for b in batches.batches)


def test_float32_rates_are_logged_as_their_shortest_decimal(tmp_path):
    """A float32 rate of 0.01 is 0.01 (not 0.009999999776482582) in the epoch and batch logs,
    the CSV file and ``trainer.learning_rate``; each reads back to the state's rate."""
    model, _, x, y = _regression()
    params = model.init(torch.Generator().manual_seed(0), dtype=torch.float32)
    x32, y32 = x.float(), y.float()
    recorder, batches, log = Recorder(), BatchRecorder(), tmp_path / "log.csv"
    result = fnmlp.fit(model, params, x32, y32, epochs=2, batch_size=16,
                       optimizer=fnmlp.adam(0.01),
                       callbacks=[recorder, batches, CSVLogger(log)], compile=False)
    assert result.opt_state.learning_rate.dtype == torch.float32
    assert result.opt_state.learning_rate.item() == 0.009999999776482582
    assert [logs["lr"] for logs in recorder.epochs()] == [0.01, 0.01]
    assert [call[3] for call in recorder.calls[1:-1]] == [0.01, 0.01]  # trainer.learning_rate
    assert [b["lr"] for b in batches.batches] == [0.01] * 8
    assert [row["lr"] for row in _rows(log)] == ["0.01", "0.01"]
    optimizer = fnmlp.sgd(fnmlp.schedules.exponential(0.01, gamma=0.9))
    recorder = Recorder()
    result = fnmlp.fit(model, params, x32, y32, epochs=2, batch_size=16, optimizer=optimizer,
                       callbacks=[recorder], compile=False)
    last = recorder.epochs()[-1]["lr"]
    assert torch.tensor(last, dtype=torch.float32) == optimizer.learning_rate(result.opt_state)
    assert len(repr(last)) <= len("0.") + 9 + 4  # at most 9 digits, not float64's 17
    ensemble = fnmlp.Ensemble(model, 2)
    recorder = Recorder()
    fnmlp.fit(ensemble, ensemble.init(torch.Generator().manual_seed(0), dtype=torch.float32),
              x32, y32, epochs=1, batch_size=16, optimizer=fnmlp.sgd(0.1), lr=[0.1, 0.07],
              callbacks=[recorder], compile=False)
    assert recorder.epochs()[0]["lr"] == [0.1, 0.07] and recorder.calls[1][3] == [0.1, 0.07]


# --- writers ---------------------------------------------------------------------------------


def _rows(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def test_csv_logger_writes_a_row_per_epoch_and_appends_when_asked(tmp_path):
    model, params, x, y = _regression()
    path = tmp_path / "log.csv"
    kwargs = dict(batch_size=16, optimizer=fnmlp.sgd(0.1), valid=(x[:16], y[:16]),
                  compile=False)
    result = fnmlp.fit(model, params, x, y, epochs=3, callbacks=[CSVLogger(path)], **kwargs)
    rows = _rows(path)
    assert list(rows[0]) == KEYS
    assert [float(r["train_loss"]) for r in rows] == result.history.train_loss  # exact floats
    fnmlp.fit(model, params, x, y, epochs=2, callbacks=[CSVLogger(path, append=True)], **kwargs)
    assert [r["epoch"] for r in _rows(path)] == ["0", "1", "2", "0", "1"]
    fnmlp.fit(model, params, x, y, epochs=1, callbacks=[CSVLogger(path)], **kwargs)
    assert len(_rows(path)) == 1  # overwritten


def test_csv_logger_spreads_an_ensembles_members_into_columns(tmp_path):
    model, _, x, y = _regression()
    ensemble = fnmlp.Ensemble(model, 2)
    path = tmp_path / "log.csv"
    result = fnmlp.fit(ensemble, ensemble.init(torch.Generator().manual_seed(0), dtype=F64),
                       x, y, epochs=2, batch_size=16, optimizer=fnmlp.sgd(0.1),
                       callbacks=[CSVLogger(path)], compile=False)
    rows = _rows(path)
    assert list(rows[0]) == ["epoch", "train_loss_0", "train_loss_1", "lr_0", "lr_1",
                             "epoch_time", "samples_per_s"]
    assert [float(rows[1][f"train_loss_{k}"]) for k in range(2)] == result.history.train_loss[1]


def test_writers_refuse_bad_paths_before_any_work(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a directory"):
        CSVLogger(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CSVLogger(tmp_path / "missing" / "log.csv")
    with pytest.raises(TypeError, match="must be a path"):
        CSVLogger(3)
    real_access = os.access
    with pytest.MonkeyPatch.context() as patch:  # as for a user without write permission
        patch.setattr(os, "access", lambda path, mode, **kw: (
            False if mode & os.W_OK and os.fspath(path) == str(tmp_path)
            else real_access(path, mode, **kw)))
        with pytest.raises(PermissionError, match="log file .* is not writable"):
            CSVLogger(tmp_path / "log.csv")
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        TensorBoard(tmp_path / "file")


def test_tensorboard_writes_scalars_that_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model, params, x, y = _regression()
    result = fnmlp.fit(model, params, x, y, epochs=3, batch_size=16, optimizer=fnmlp.sgd(0.1),
                       valid=(x[:16], y[:16]), metrics={"r2": fnmlp.metrics.r2},
                       callbacks=[TensorBoard(tmp_path / "tb")], compile=False)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"train_loss", "valid_loss", "r2", "valid_r2", "lr",
                                             "epoch_time", "samples_per_s"}
    train = events.Scalars("train_loss")
    assert [event.step for event in train] == [0, 1, 2]
    assert [event.value for event in train] == pytest.approx(result.history.train_loss,
                                                             rel=1e-6)  # stored as float32


def test_tensorboard_without_the_package_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(ImportError, match="pip install tensorboard"):
        TensorBoard(tmp_path / "tb")


# --- ReduceLROnPlateau -----------------------------------------------------------------------


class Rates(Callback):
    """The base rate after every epoch (after the callbacks before it)."""

    def __init__(self):
        self.rates = []

    def on_epoch_end(self, epoch, logs):
        self.rates.append(self.trainer.learning_rate)


def _torch_rates(losses, lr, **options):
    parameter = torch.nn.Parameter(torch.zeros(1, dtype=F64))
    optimizer = torch.optim.SGD([parameter], lr=lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, **options)
    rates = []
    for loss in losses:
        scheduler.step(loss)
        rates.append(optimizer.param_groups[0]["lr"])
    return rates


@pytest.mark.parametrize("options", [
    dict(patience=1, factor=0.5),
    dict(patience=0, threshold=0.02, cooldown=2, factor=0.3),
    dict(patience=1, threshold=1e-3, threshold_mode="abs", min_lr=0.01),
    dict(patience=0, mode="max", factor=0.5, eps=1e-3),
])
def test_reduce_on_plateau_follows_torchs_scheduler_fed_the_same_losses(options):
    model, params, x, y = _regression()
    rates = Rates()
    result = fnmlp.fit(model, params, x, y, epochs=20, batch_size=16, optimizer=fnmlp.sgd(0.4),
                       valid=(x[:16] + 0.5, y[:16]), shuffle=True,
                       generator=torch.Generator().manual_seed(2),
                       callbacks=[ReduceLROnPlateau(**options), rates], compile=False)
    expected = _torch_rates(result.history.valid_loss, 0.4, **options)
    assert rates.rates == expected
    assert len(set(expected)) > 1  # the rate changed in the run


def test_reduce_on_plateau_matches_the_torch_twin_driven_by_torchs_scheduler():
    """float64: fnmlp's fit with the callback against the twin trained with torch.optim.SGD
    and torch's ReduceLROnPlateau stepped on the twin's own validation losses: bit-identical
    at the checked CPU capabilities (``helpers.exact_here``), else within 1e-12."""
    model, params, x, y = _regression(rows=96)
    xv, yv = x[:32] + 0.3, y[:32]
    options = dict(patience=0, threshold=0.02, factor=0.5)
    rates = Rates()
    result = fnmlp.fit(model, params, x, y, epochs=12, batch_size=32, optimizer=fnmlp.sgd(0.6),
                       valid=(xv, yv), callbacks=[ReduceLROnPlateau(**options), rates],
                       compile=False)
    twin = fnmlp.to_torch(model, params)
    optimizer = torch.optim.SGD(twin.parameters(), lr=0.6)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, **options)
    twin_valid, twin_rates = [], []
    for _ in range(12):
        for start in range(0, 96, 32):
            optimizer.zero_grad()
            torch.nn.MSELoss()(twin(x[start:start + 32]), y[start:start + 32]).backward()
            optimizer.step()
        with torch.no_grad():
            twin_valid.append(torch.nn.MSELoss()(twin(xv), yv).item())
        scheduler.step(twin_valid[-1])
        twin_rates.append(optimizer.param_groups[0]["lr"])
    assert rates.rates == twin_rates and len(set(twin_rates)) > 2
    if exact_here():
        assert result.history.valid_loss == twin_valid
    assert result.history.valid_loss == pytest.approx(twin_valid, rel=1e-12, abs=0)
    for ours, theirs in zip(leaves(result.params), twin.parameters()):
        assert_exact_where_checked(ours, theirs.detach(), rtol=1e-12, atol=1e-14,
                                   what="a parameter after the fit")


def test_an_ensemble_has_a_plateau_per_member():
    model, _, x, y = _regression()
    ensemble = fnmlp.Ensemble(model, 3)
    params = ensemble.init(torch.Generator().manual_seed(0), dtype=F64)
    options = dict(patience=1, factor=0.5, threshold=0.01)
    rates = Rates()
    result = fnmlp.fit(ensemble, params, x, y, epochs=12, batch_size=16,
                       optimizer=fnmlp.sgd(0.3), lr=[0.1, 0.3, 0.6],
                       valid=(x[:16] + 0.5, y[:16]),
                       callbacks=[ReduceLROnPlateau(**options), rates], compile=False)
    for k, lr in enumerate([0.1, 0.3, 0.6]):
        member = [losses[k] for losses in result.history.valid_loss]
        assert [r[k] for r in rates.rates] == _torch_rates(member, lr, **options)
    with pytest.raises(ValueError, match="min_lr has 2 values for 3 member"):
        fnmlp.fit(ensemble, params, x, y, epochs=1, batch_size=16, optimizer=fnmlp.sgd(0.3),
                  valid=(x, y), callbacks=[ReduceLROnPlateau(min_lr=[0.0, 0.1])])


def test_an_ensembles_plateau_on_a_value_of_the_whole_fit_reduces_every_member():
    """A monitor the logs hold once (``epoch_time``, ``samples_per_s``; here ``epoch``, which
    never improves in mode "min") feeds every member's plateau."""
    model, _, x, y = _regression()
    ensemble = fnmlp.Ensemble(model, 3)
    rates = Rates()
    fnmlp.fit(ensemble, ensemble.init(torch.Generator().manual_seed(0), dtype=F64), x, y,
              epochs=3, batch_size=16, optimizer=fnmlp.sgd(0.1), lr=[0.1, 0.2, 0.4],
              callbacks=[ReduceLROnPlateau(monitor="epoch", patience=0, factor=0.5), rates],
              compile=False)
    assert rates.rates == [[0.1, 0.2, 0.4], [0.05, 0.1, 0.2], [0.025, 0.05, 0.1]]


def test_reduce_on_plateau_without_its_monitor_fails_before_the_first_step():
    model, params, x, y = _regression()
    batches = BatchRecorder()
    with pytest.raises(ValueError, match=r"monitors 'valid_loss'.*needs valid="):
        fnmlp.fit(model, params, x, y, epochs=3, batch_size=16, optimizer=fnmlp.sgd(0.1),
                  callbacks=[batches, ReduceLROnPlateau()])
    assert batches.batches == []
    with pytest.raises(ValueError, match="monitors 'r2'"):
        fnmlp.fit(model, params, x, y, epochs=3, batch_size=16, optimizer=fnmlp.sgd(0.1),
                  callbacks=[ReduceLROnPlateau(monitor="r2", mode="max")])


@pytest.mark.parametrize("options, match", [
    (dict(factor=1.0), "factor must be in"),
    (dict(patience=-1), "patience must be an integer"),
    (dict(mode="lowest"), "mode must be"),
    (dict(threshold_mode="pct"), "threshold_mode must be"),
    (dict(min_lr=-1.0), "min_lr must be"),
])
def test_reduce_on_plateau_refuses_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        ReduceLROnPlateau(**options)


def _plateau_fit(path, callbacks, epochs=14, **extra):
    model, params, x, y = _regression()
    return fnmlp.fit(model, params, x, y, epochs=epochs, batch_size=16,
                     optimizer=fnmlp.adam(0.05), valid=(x[:16] + 0.5, y[:16]), shuffle=True,
                     generator=torch.Generator().manual_seed(4), callbacks=callbacks,
                     compile=False, **({} if path is None else dict(checkpoint=path,
                                                                    resume=True)), **extra)


def test_a_killed_fit_resumes_mid_plateau_bit_identical(tmp_path):
    options = dict(patience=3, factor=0.5, threshold=0.05)

    class Counters(Callback):
        def __init__(self, plateau):
            self.plateau, self.bad = plateau, []

        def on_epoch_end(self, epoch, logs):
            self.bad.append(self.plateau.num_bad_epochs[0])

    plateau, rates = ReduceLROnPlateau(**options), Rates()
    counters = Counters(plateau)
    whole = _plateau_fit(None, [plateau, rates, counters])
    assert len(set(rates.rates)) > 1  # it reduced
    # killed after an epoch whose checkpoint (the epoch before) is in the middle of a plateau
    kill = next(e for e in range(2, 14) if counters.bad[e - 1] > 0 and counters.bad[e] > 0)
    path = tmp_path / "run.fnmlp"
    with pytest.raises(_Killed):
        _plateau_fit(path, [ReduceLROnPlateau(**options), Rates(), Kill(kill)])
    saved = fnmlp.load(path).metadata["fnmlp_fit"]
    assert saved["epoch"] == kill  # the epoch before the kill was checkpointed
    assert saved["extras"]["callbacks"]["0:ReduceLROnPlateau"]["num_bad_epochs"] == [
        counters.bad[kill - 1]]
    resumed_rates = Rates()
    resumed = _plateau_fit(path, [ReduceLROnPlateau(**options), resumed_rates])
    assert resumed.history == whole.history
    assert resumed_rates.rates == rates.rates[kill:]
    assert all(torch.equal(a, b) for a, b in zip(
        leaves((resumed.params, resumed.opt_state)), leaves((whole.params, whole.opt_state))))


def test_a_resumed_csv_log_keeps_the_rows_to_the_checkpoint_and_appends(tmp_path):
    path, log = tmp_path / "run.fnmlp", tmp_path / "log.csv"
    whole = _plateau_fit(None, [], epochs=6)
    with pytest.raises(_Killed):  # checkpoints after epochs 1 and 3; killed after epoch 4
        _plateau_fit(path, [CSVLogger(log), Kill(4)], epochs=6, checkpoint_every=2)
    assert [r["epoch"] for r in _rows(log)] == ["0", "1", "2", "3", "4"]
    resumed = _plateau_fit(path, [CSVLogger(log)], epochs=6, checkpoint_every=2)
    rows = _rows(log)
    assert [r["epoch"] for r in rows] == ["0", "1", "2", "3", "4", "5"]
    assert [float(r["train_loss"]) for r in rows] == whole.history.train_loss
    assert resumed.history == whole.history
    saved = fnmlp.load(path).metadata["fnmlp_fit"]["extras"]["callbacks"]["0:CSVLogger"]
    assert saved["path"] == os.path.abspath(log) and saved["fields"] == list(rows[0])
    assert saved["size"] == os.path.getsize(log)


def _text(path):
    with open(path, newline="", encoding="utf-8") as file:
        return file.read()


@pytest.mark.parametrize("change", ["shortened", "another file", "another header", "gone"])
def test_a_resumed_csv_log_is_cut_back_only_when_it_is_the_checkpoints(tmp_path, change):
    """The log changed since the checkpoint (or the resumed fit logs elsewhere): a warning
    says why and the rows are appended; the file is never cut at an unrelated offset nor
    padded with NULs; under a header that is not the fit's columns, the rows start under a
    new header line (with a warning), never losing a column."""
    path, log = tmp_path / "run.fnmlp", tmp_path / "log.csv"
    with pytest.raises(_Killed):  # checkpoints after epochs 1 and 3; killed after epoch 4
        _plateau_fit(path, [CSVLogger(log), Kill(4)], epochs=6, checkpoint_every=2)
    target = log
    if change == "shortened":  # the header and the first row only
        lines = _text(log).splitlines(keepends=True)
        log.write_text("".join(lines[:2]), encoding="utf-8")
    elif change == "another file":
        target = tmp_path / "other.csv"
        target.write_text("a,b\n" + "1,2\n" * 500, encoding="utf-8")  # longer than the log
    elif change == "another header":
        text = _text(log)
        log.write_text(text.replace("train_loss", "loss", 1) + "\n" * 10, encoding="utf-8")
    else:
        log.unlink()
    before = _text(target) if target.exists() else ""
    why = {"shortened": "fewer than", "another file": "not this file",
           "another header": "header", "gone": "no longer exists"}[change]
    renamed = change in ("another file", "another header")
    with pytest.warns(UserWarning, match=f"without cutting the file back.*{why}"), (
            pytest.warns(UserWarning, match="new header line") if renamed
            else contextlib.nullcontext()):
        _plateau_fit(path, [CSVLogger(target)], epochs=6, checkpoint_every=2)
    after = _text(target)
    assert after.startswith(before) and "\x00" not in after
    rows = list(csv.reader(after.splitlines()[len(before.splitlines()):]))
    if change in ("gone", "another file", "another header"):  # under this fit's own header
        assert rows[0] == KEYS and [r[0] for r in rows[1:]] == ["4", "5"]
        assert all(cell != "" for row in rows for cell in row)
    else:
        assert len(rows) == 2  # epochs 4 and 5, under the file's own header (the fit's)


def test_a_resumed_csv_log_unchanged_since_the_checkpoint_resumes_without_a_warning(tmp_path):
    path, log = tmp_path / "run.fnmlp", tmp_path / "log.csv"
    with pytest.raises(_Killed):
        _plateau_fit(path, [CSVLogger(log), Kill(2)], epochs=4, checkpoint_every=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _plateau_fit(path, [CSVLogger(log)], epochs=4, checkpoint_every=2)
    assert [r["epoch"] for r in _rows(log)] == ["0", "1", "2", "3"]


def test_callback_states_keep_non_finite_floats_as_the_fits_losses_are(tmp_path):
    """One spelling of inf and NaN in a checkpoint's metadata: the strings the fit's own
    losses use; they come back as floats (and the first callbacks' spelling still loads)."""
    from fnmlp.train._run import json_floats_back

    class Extremes(Callback):
        def __init__(self):
            self.loaded = None

        def state_dict(self):
            return {"low": -math.inf, "high": [math.inf], "odd": math.nan, "name": "plain"}

        def load_state_dict(self, state):
            self.loaded = state

    path = tmp_path / "run.fnmlp"
    with pytest.raises(_Killed):
        _plateau_fit(path, [Extremes(), Kill(1)], epochs=3)
    saved = fnmlp.load(path).metadata["fnmlp_fit"]
    assert saved["extras"]["callbacks"]["0:Extremes"] == {"low": "-inf", "high": ["inf"],
                                                          "odd": "nan", "name": "plain"}
    assert all(isinstance(v, float) for v in saved["best_loss"])  # finite: numbers
    extremes = Extremes()
    _plateau_fit(path, [extremes], epochs=3)
    loaded = extremes.loaded
    assert loaded["low"] == -math.inf and loaded["high"] == [math.inf]
    assert math.isnan(loaded["odd"]) and loaded["name"] == "plain"
    assert json_floats_back({"best": [{"__float__": "inf"}], "k": {"__float__": "-inf"}}) == {
        "best": [math.inf], "k": -math.inf}


def test_the_nonfinite_checkpoint_holds_the_callbacks_state_at_that_point(tmp_path):
    model, params, x, y = _regression()

    class Explode(Callback):
        def on_epoch_end(self, epoch, logs):
            if epoch == 3:
                self.trainer.learning_rate = 1e150

    plateau = ReduceLROnPlateau(monitor="train_loss", patience=100)
    path = tmp_path / "run.fnmlp"
    with pytest.raises(fnmlp.NonFiniteLossError):
        fnmlp.fit(model, params, x, y, epochs=10, batch_size=16, optimizer=fnmlp.sgd(0.1),
                  callbacks=[plateau, Explode()], checkpoint=path, checkpoint_every=3,
                  compile=False)
    assert fnmlp.load(path).metadata["fnmlp_fit"]["epoch"] == 3  # the regular checkpoint
    nonfinite = fnmlp.load(f"{path}.nonfinite").metadata["fnmlp_fit"]
    state = nonfinite["extras"]["callbacks"]["0:ReduceLROnPlateau"]
    assert state == plateau.state_dict() and state["last_epoch"] == 4  # epochs 0..3 ran


@pytest.mark.slow
def test_reduce_on_plateau_never_recompiles_a_compiled_step():
    import torch._dynamo

    model, params, x, y = _regression()
    rates = Rates()
    torch._dynamo.utils.counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        fnmlp.fit(model, params, x, y, epochs=6, batch_size=16, optimizer=fnmlp.sgd(0.4),
                  valid=(x[:16] + 0.5, y[:16]), compile=True, compiler="dynamo",
                  callbacks=[ReduceLROnPlateau(patience=0, threshold=0.5), rates])
    assert len(set(rates.rates)) > 2  # reduced more than once
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # compiled, once


def test_csv_logger_appending_under_another_header_is_refused_before_any_work(tmp_path):
    """``append=True`` to a file whose header is not this fit's columns (a fit that adds
    ``valid_loss`` or a metric, another program's file) would lose columns: refused in
    ``check``, the file untouched; under the same columns it appends."""
    model, params, x, y = _regression()
    path = tmp_path / "log.csv"
    kwargs = dict(epochs=1, batch_size=16, optimizer=fnmlp.sgd(0.1), compile=False)
    fnmlp.fit(model, params, x, y, callbacks=[CSVLogger(path)], **kwargs)
    before = _text(path)
    for extra in (dict(valid=(x, y)), dict(metrics={"r2": fnmlp.metrics.r2})):
        recorder = Recorder()
        with pytest.raises(ValueError, match=r"append=True.*under the file's header "
                                             r"epoch,train_loss,lr.*another path.*append=False"):
            fnmlp.fit(model, params, x, y, callbacks=[recorder, CSVLogger(path, append=True)],
                      **extra, **kwargs)
        assert _text(path) == before and recorder.trainer is None
    foreign = tmp_path / "foreign.csv"
    foreign.write_text("a,b\n1,2\n", encoding="utf-8")
    with pytest.raises(ValueError, match="header a,b"):
        fnmlp.fit(model, params, x, y, callbacks=[CSVLogger(foreign, append=True)], **kwargs)
    assert foreign.read_text(encoding="utf-8") == "a,b\n1,2\n"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fnmlp.fit(model, params, x, y, callbacks=[CSVLogger(path, append=True)], **kwargs)
    assert [r["epoch"] for r in _rows(path)] == ["0", "0"]


@pytest.mark.parametrize("size", [1, 2])
def test_csv_logger_appending_checks_an_ensembles_member_columns(tmp_path, size):
    model, _, x, y = _regression()
    path = tmp_path / "log.csv"
    kwargs = dict(epochs=1, batch_size=16, optimizer=fnmlp.sgd(0.1), compile=False)
    ensemble = fnmlp.Ensemble(model, size)
    params = ensemble.init(torch.Generator().manual_seed(0), dtype=F64)
    fnmlp.fit(ensemble, params, x, y, callbacks=[CSVLogger(path)], **kwargs)
    fnmlp.fit(ensemble, params, x, y, callbacks=[CSVLogger(path, append=True)], **kwargs)
    rows = _rows(path)
    assert len(rows) == 2 and all(value != "" for row in rows for value in row.values())
    bigger = fnmlp.Ensemble(model, 3)
    with pytest.raises(ValueError, match=r"columns epoch,train_loss_0,train_loss_1,"
                                         r"train_loss_2,lr_0"):
        fnmlp.fit(bigger, bigger.init(torch.Generator().manual_seed(0), dtype=F64), x, y,
                  callbacks=[CSVLogger(path, append=True)], **kwargs)


def test_a_resumed_csv_log_with_other_columns_starts_a_new_header_line(tmp_path):
    """A resumed fit that adds a metric: the rows to the checkpoint are kept, a warning says
    the new rows start under a new header line, and none of their columns is lost; a later
    resume of that fit cuts the file back as usual."""
    path, log = tmp_path / "run.fnmlp", tmp_path / "log.csv"
    with pytest.raises(_Killed):  # checkpoints after epochs 1 and 3; killed after epoch 4
        _plateau_fit(path, [CSVLogger(log), Kill(4)], epochs=6, checkpoint_every=2)
    with pytest.warns(UserWarning, match="new header line"):
        with pytest.raises(_Killed):
            _plateau_fit(path, [CSVLogger(log), Kill(6)], epochs=8, checkpoint_every=2,
                         metrics={"r2": fnmlp.metrics.r2})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the file is the checkpoint's: cut back, no warning
        _plateau_fit(path, [CSVLogger(log)], epochs=8, checkpoint_every=2,
                     metrics={"r2": fnmlp.metrics.r2})
    lines = list(csv.reader(_text(log).splitlines()))
    assert lines[0] == KEYS and [r[0] for r in lines[1:5]] == ["0", "1", "2", "3"]
    assert lines[5] == ["epoch", "train_loss", "valid_loss", "r2", "valid_r2", *KEYS[3:]]
    assert [r[0] for r in lines[6:]] == ["4", "5", "6", "7"]
    assert all(cell != "" for row in lines for cell in row)


def test_a_row_whose_keys_are_not_the_headers_is_written_with_one_warning(tmp_path):
    class Adds(Callback):  # before the logger: it sees the key from epoch 1 on
        def on_epoch_end(self, epoch, logs):
            if epoch >= 1:
                logs["extra"] = 1.0

    model, params, x, y = _regression()
    path = tmp_path / "log.csv"
    with pytest.warns(UserWarning, match=r"values without a column .*\['extra'\]") as caught:
        fnmlp.fit(model, params, x, y, epochs=3, batch_size=16, optimizer=fnmlp.sgd(0.1),
                  callbacks=[Adds(), CSVLogger(path)], compile=False)
    assert len([w for w in caught if "CSVLogger" in str(w.message)]) == 1
    assert len(_rows(path)) == 3


@pytest.mark.parametrize("state, match", [
    ({"h": (1, 2)}, r"state_dict\(\)\['h'\] is a tuple"),
    ({1: "x"}, r"key 1 \(int\)"),
    ({"a": [{"b": {2.0: 1}}]}, r"state_dict\(\)\['a'\]\[0\]\['b'\] has the key 2.0"),
])
def test_a_state_that_would_not_come_back_unchanged_is_refused_before_the_first_step(
        tmp_path, state, match):
    model, params, x, y = _regression()

    class Keeps(BatchRecorder):
        def state_dict(self):
            return state

    keeps = Keeps()
    with pytest.raises(TypeError, match=f"0:Keeps's state_dict.*{match}"):
        fnmlp.fit(model, params, x, y, epochs=1, batch_size=16, optimizer=fnmlp.sgd(0.1),
                  callbacks=[keeps], checkpoint=tmp_path / "run.fnmlp")
    assert keeps.batches == [] and not (tmp_path / "run.fnmlp").exists()


@pytest.mark.parametrize("metric, error, match", [
    (lambda p: 1.0, TypeError, r"metrics\['m'\] must take two positional arguments"),
    (lambda p, y: [1.0], TypeError, r"metrics\['m'\].*must return a number.*got list"),
    (lambda p, y: (p @ y).sum(), RuntimeError,
     r"metrics\['m'\] failed on the first rows of the training data.*RuntimeError"),
    (lambda p, y: 1 / 0 if y.max() > 500 else 1.0, ValueError,  # the validation targets
     r"metrics\['m'\] failed on the first rows of the validation data.*ZeroDivisionError"),
])
def test_a_metric_that_cannot_run_is_refused_before_any_work(tmp_path, metric, error, match):
    """Wrong arity, no number, failing on the data: named before any work, before a
    ``CSVLogger`` truncates its file."""
    model, params, x, y = _regression()
    path = tmp_path / "log.csv"
    path.write_text("kept\n", encoding="utf-8")
    recorder = BatchRecorder()
    with pytest.raises(ValueError if error is RuntimeError else error, match=match):
        fnmlp.fit(model, params, x, y, epochs=1, batch_size=16, optimizer=fnmlp.sgd(0.1),
                  valid=(x[:16], y[:16] + 1000), metrics={"m": metric},
                  callbacks=[recorder, CSVLogger(path)])
    assert path.read_text(encoding="utf-8") == "kept\n"
    assert recorder.trainer is None and recorder.batches == []


def test_a_metric_that_fails_on_the_first_rows_only_is_accepted():
    """A metric that needs more rows than the first few (every class, say) is tried on all of
    them before it is refused."""
    model, params, x, y = _regression()

    def needs_rows(prediction, target):
        if prediction.shape[0] < 10:
            raise ValueError("needs 10 rows")
        return fnmlp.metrics.r2(prediction, target)

    recorder = Recorder()
    fnmlp.fit(model, params, x, y, epochs=1, batch_size=16, optimizer=fnmlp.sgd(0.1),
              metrics={"m": needs_rows}, callbacks=[recorder])
    assert "m" in recorder.epochs()[0]
