"""Callbacks: the user's hooks into a fit (``fnmlp.callbacks.Callback``), what they see of it
(``Trainer``) and the policy that runs them in the one loop (``CallbackRunner``)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence

import torch

from fnmlp.train._executor import Carry
from fnmlp.train._loop import Policy, Run, rate_values
from fnmlp.train._policies import epoch_logs
from fnmlp.train._run import json_floats, json_floats_back


class Callback:
    """Base class of a fit's callbacks (``fit(..., callbacks=[...])``); override what you need.

    ``check(log_keys, members)`` comes first, before any work (before any callback's
    ``on_train_begin``). Before ``on_train_begin``, ``self.trainer`` is set to the fit's
    ``Trainer`` (its epoch, step count, parameters, states, settable ``learning_rate`` and
    ``stop_training``). Per-member values (losses, metrics, ``lr``) are floats for one
    network, lists of K floats for an ensemble (of one member too).

    ``lead_only = True`` (the writers): in a data-parallel fit the callback runs on the lead
    process only. ``state_dict()``: JSON data (floats may be inf or NaN) that a checkpoint
    keeps and a resumed fit gives back through ``load_state_dict(state)`` before
    ``on_train_begin``; None (the default): nothing to keep.
    """

    lead_only: bool = False
    trainer: Trainer | None = None

    def check(self, log_keys: list[str], members: int) -> None:
        """Raise here (a clear error, before any work) for a configuration this fit cannot
        satisfy; ``log_keys``: the keys every epoch's logs will have; ``members``: 1, or K
        for an ensemble. Called for every callback before any callback's
        ``on_train_begin``."""

    def on_train_begin(self, logs: dict) -> None:
        """Before the first step; ``logs``: ``epoch`` (the first to run), ``epochs``,
        ``steps_done``, ``resumed`` (the fit continues a checkpoint)."""

    def on_batch_end(self, batch: int, logs: dict) -> None:
        """After each step; ``logs``: ``epoch``, ``batch``, ``loss``, ``rows``, ``lr`` (the
        rate that step used). Overriding it costs a sync per batch (each loss is read then);
        with ``steps_per_call`` > 1 it runs for each batch of a chunk after the chunk ran."""

    def on_epoch_end(self, epoch: int, logs: dict) -> bool | None:
        """After each epoch; ``logs``: ``epoch``, ``train_loss``, ``valid_loss``, the metrics,
        ``lr``, ``epoch_time``, ``samples_per_s``. A true result stops the fit (as does
        ``self.trainer.stop_training = True``)."""
        return None

    def on_train_end(self, logs: dict) -> None:
        """When the fit ends, however it ends; ``logs``: the last epoch's, ``epochs_done``,
        ``steps_done`` and ``error`` (the exception leaving the fit, or None)."""

    def state_dict(self) -> dict | None:
        """What a checkpoint keeps of this callback (JSON), or None. Non-finite floats are
        kept as the strings "inf", "-inf" and "nan" (as the fit's own losses are), and come
        back as floats: those three strings come back as floats whatever they were."""
        return None

    def load_state_dict(self, state: dict) -> None:
        """Take back what ``state_dict`` gave, in a resumed fit."""


class FunctionCallback(Callback):
    """``fit(on_epoch_end=f)``: ``f(epoch, logs) -> stop?`` after every epoch."""

    def __init__(self, function: Callable):
        self.function = function

    def on_epoch_end(self, epoch: int, logs: dict) -> bool:
        return bool(self.function(epoch, logs))


class Trainer:
    """What a callback sees of the fit in progress (``callback.trainer``).

    ``epoch``: the epoch in progress, from 0 (in ``on_epoch_end``: the one that ended);
    ``epochs``: the fit's; ``members``: 1, or K for an ensemble; ``log_keys``: the keys of
    every epoch's logs; ``steps_done``, ``params``, ``state``, ``opt_state``: the run's now;
    ``learning_rate``: the optimizer's base rate (before a schedule; a list of K for an
    ensemble), settable; ``stop_training``: set True to stop after this epoch.
    """

    def __init__(self, run: Run, optimizer, *, epochs: int, log_keys: Sequence[str],
                 member: Callable | None = None):
        self._run, self._optimizer, self._member = run, optimizer, member
        self.epoch, self.epochs, self.members = run.epoch, epochs, run.members
        self.log_keys = tuple(log_keys)
        self.stop_training = False

    @property
    def steps_done(self) -> int:
        return self._run.steps_done

    @property
    def params(self):
        return self._run.carry.params

    @property
    def state(self):
        return self._run.carry.state

    @property
    def opt_state(self):
        return self._run.carry.opt_state

    @property
    def learning_rate(self) -> float | list[float]:
        """The optimizer's base rate (the state's; a schedule scales it at each step), as the
        shortest decimal of its dtype's value (a float32 0.01 is 0.01); a list for an
        ensemble."""
        rates = rate_values(self._run.carry.opt_state.learning_rate.reshape(-1))
        return rates if self._member is not None else rates[0]

    @learning_rate.setter
    def learning_rate(self, lr) -> None:
        """A new base rate (one for every member, or a list of K) through the optimizer's
        ``with_learning_rate``: a tensor of the state, so a compiled step never recompiles."""
        run, optimizer, state = self._run, self._optimizer, self._run.carry.opt_state
        if self._member is None:
            state = optimizer.with_learning_rate(state, lr)
        else:
            rates = list(lr) if isinstance(lr, (list, tuple)) else [lr] * self.members
            if len(rates) != self.members:
                raise ValueError(f"learning_rate takes one rate or {self.members} (one per "
                                 f"member), got {len(rates)}")
            new = torch.stack([optimizer.with_learning_rate(self._member(state, k), rate)
                               .learning_rate for k, rate in enumerate(rates)])
            state = dataclasses.replace(state, learning_rate=new)
        run.carry = Carry(run.carry.params, state, run.carry.state)


def check_callbacks(callbacks, on_epoch_end=None, *, log_keys: Sequence[str],
                    members: int) -> list[Callback]:
    """``callbacks`` (None, or a list of ``Callback``) and ``on_epoch_end`` as one list, or a
    clear error before any work: each callback's ``check(log_keys, members)`` is called here
    (``log_keys``: those of the fit's epoch logs; ``members``: 1, or K for an ensemble)."""
    if callbacks is None:
        callbacks = []
    if isinstance(callbacks, Callback):
        raise TypeError(f"callbacks must be a list of fnmlp.callbacks.Callback, got a "
                        f"{type(callbacks).__name__}: pass [callback]")
    if not isinstance(callbacks, (list, tuple)):
        raise TypeError(f"callbacks must be a list of fnmlp.callbacks.Callback, got "
                        f"{type(callbacks).__name__}")
    for index, callback in enumerate(callbacks):
        if not isinstance(callback, Callback):
            raise TypeError(f"callbacks[{index}] must be an fnmlp.callbacks.Callback "
                            f"(subclass it), got {type(callback).__name__}")
        if any(other is callback for other in callbacks[:index]):
            raise ValueError(f"callbacks[{index}] is in the list twice; pass each once")
    if on_epoch_end is not None and not callable(on_epoch_end):
        raise TypeError(f"on_epoch_end must be callable, got {on_epoch_end!r}")
    for callback in callbacks:
        callback.check(list(log_keys), members)
    return [*callbacks, *([FunctionCallback(on_epoch_end)] if on_epoch_end is not None else [])]


class CallbackRunner(Policy):
    """Runs ``Callback`` objects in the loop: their hooks in order, their stop requests, their
    state in ``run.extras["callbacks"]`` (keyed ``"<index>:<class>"``, so a resumed fit with the
    same callbacks gives each its own back).

    Arguments:
        callbacks: ``check_callbacks``'s list.
        lead: whether this process is the lead one (``lead_only`` callbacks run only there).
        optimizer, epochs, log_keys, member: the ``Trainer``'s (``member``: an ensemble's
            ``member(tree, k)``, None for one network: per-member values are lists exactly
            when it is given, for an ensemble of one member too).
    """

    def __init__(self, callbacks: Sequence[Callback], *, lead: bool, optimizer, epochs: int,
                 log_keys: Sequence[str], member: Callable | None = None):
        self.callbacks = [(f"{index}:{type(callback).__name__}", callback)
                          for index, callback in enumerate(callbacks)
                          if lead or not callback.lead_only]
        self.batch_logs = any(type(callback).on_batch_end is not Callback.on_batch_end
                              for _, callback in self.callbacks)
        self.optimizer, self.epochs, self.log_keys, self.member = (optimizer, epochs, log_keys,
                                                                   member)
        self.ensemble = member is not None
        self.trainer: Trainer  # made by on_train_begin
        self.begun: list[Callback] = []
        self.last_logs: dict = {}

    def on_train_begin(self, run: Run) -> None:
        self.trainer = Trainer(run, self.optimizer, epochs=self.epochs, log_keys=self.log_keys,
                               member=self.member)
        saved = run.extras.get("callbacks", {})
        for key, callback in self.callbacks:
            if key in saved:
                callback.load_state_dict(json_floats_back(saved[key]))
            callback.trainer = self.trainer
        logs = {"epoch": run.epoch, "epochs": self.epochs, "steps_done": run.steps_done,
                "resumed": run.epoch > 0}
        for key, callback in self.callbacks:
            _state_json(key, callback)  # a state a checkpoint cannot keep: refused now
            callback.on_train_begin(dict(logs))
            self.begun.append(callback)

    def on_batch_end(self, run: Run, logs: dict) -> None:
        def shown(values):
            return list(values) if self.ensemble else values[0]

        user = {"epoch": logs["epoch"], "batch": logs["batch"], "loss": shown(logs["losses"]),
                "rows": logs["rows"]}
        if "lrs" in logs:
            user["lr"] = shown(logs["lrs"])
        self.trainer.epoch = logs["epoch"]
        for _, callback in self.callbacks:
            callback.on_batch_end(logs["batch"], user)

    def on_epoch_end(self, run: Run, logs: dict) -> bool:
        user = epoch_logs(logs, self.ensemble)
        self.trainer.epoch = logs["epoch"]
        stop = False
        for _, callback in self.callbacks:
            stop = bool(callback.on_epoch_end(logs["epoch"], user)) or stop
        self.last_logs = user
        return stop or self.trainer.stop_training

    def on_checkpoint(self, run: Run) -> None:
        states = {}
        for key, callback in self.callbacks:
            state = _state_json(key, callback)
            if state is not None:
                states[key] = state
        run.extras["callbacks"] = states

    def on_train_end(self, run: Run, error: BaseException | None) -> None:
        logs = {**self.last_logs, "epochs_done": run.epoch, "steps_done": run.steps_done,
                "error": error}
        failure = None
        for callback in self.begun:  # each, even after one raised
            try:
                callback.on_train_end(dict(logs))
            except Exception as caught:  # noqa: BLE001 (raised after the others ran)
                failure = failure or caught
        if failure is not None:
            raise failure


def _state_json(key: str, callback: Callback):
    """The callback's ``state_dict()`` as JSON data (non-finite floats as strings, as
    ``fnmlp.train._run.json_floats`` keeps the fit's losses), or None; a clear error, naming
    the callback and where in its state, for a state that would not come back unchanged from
    a checkpoint (a tuple, a key that is not a string, a value that is not JSON)."""
    state = callback.state_dict()
    if state is None:
        return None
    problem = _json_problem(state, "state_dict()")
    if problem is not None:
        raise TypeError(f"callback {key}'s state_dict() must be JSON data that comes back "
                        f"unchanged from a checkpoint (dicts with str keys, lists, str, "
                        f"numbers, bools, None): {problem}")
    return json_floats(state)  # JSON now: what _json_problem lets through, non-finite as str


def _json_problem(value, path: str) -> str | None:
    """What in ``value`` (at ``path``) would not come back unchanged from JSON, or None."""
    if value is None or isinstance(value, (bool, str, int, float)):
        return None
    if isinstance(value, dict):
        for name, item in value.items():
            if not isinstance(name, str):
                return (f"{path} has the key {name!r} ({type(name).__name__}), which JSON "
                        f"would turn into the string {json.dumps(str(name))}: use str keys")
            problem = _json_problem(item, f"{path}[{name!r}]")
            if problem is not None:
                return problem
        return None
    if isinstance(value, list):
        for index, item in enumerate(value):
            problem = _json_problem(item, f"{path}[{index}]")
            if problem is not None:
                return problem
        return None
    if isinstance(value, tuple):
        return f"{path} is a tuple {value!r}, which would come back as a list: use a list"
    return (f"{path} is a {type(value).__name__} ({value!r}), not JSON data (convert it, "
            "e.g. float(value) or .tolist())")

