"""A fit's metrics (``fit(..., metrics={"r2": fnmlp.metrics.r2})``): each epoch, in evaluation
mode, on the training data (``r2``) and the validation data (``valid_r2``)."""

from __future__ import annotations

import inspect
import numbers
import time
from collections.abc import Callable, Mapping

from fnmlp.train._loop import Policy, Run

_RESERVED = {"epoch", "train_loss", "valid_loss", "loss", "lr", "epoch_time", "samples_per_s",
             "epochs_done", "steps_done", "error"}


def check_metrics(metrics) -> dict[str, Callable]:
    """``metrics`` (None, or a dict of name -> ``f(prediction, target) -> float``) as a dict,
    or a clear error before any work."""
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise TypeError("metrics must be a dict of name -> function(prediction, target) -> "
                        f"float, such as {{'r2': fnmlp.metrics.r2}}; got "
                        f"{type(metrics).__name__}")
    for name, function in metrics.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"metrics' names must be non-empty strings, got {name!r}")
        if name in _RESERVED or name.startswith("valid_"):
            raise ValueError(f"metric name {name!r} is taken by the fit's logs (or by "
                             "valid_<name>, the metric on the validation data); choose another")
        if not callable(function):
            raise TypeError(f"metrics[{name!r}] must be a function (prediction, target) -> "
                            f"float, got {type(function).__name__}")
    return dict(metrics)


def check_metrics_run(metrics: dict[str, Callable], predict: Callable, carry, train: tuple,
                      valid: tuple | None, rows: int = 8) -> None:
    """Refuse, before any work and naming it, a metric that cannot run: one that does not
    take two positional arguments (prediction, target), and one that fails or returns no
    number on the predictions ``predict(carry, x)`` (evaluation mode, as ``EpochMetrics``
    makes them) of the first ``rows`` rows of ``train`` (and of ``valid`` if given). A metric
    that fails on those rows only (one that needs every class, say) is tried on all of them
    before it is refused.

    Arguments:
        metrics, predict, train, valid: ``EpochMetrics``'s.
        carry: the run's carry before its first step (``carry.params``, ``carry.state``).
    """
    for name, function in metrics.items():
        try:
            signature = inspect.signature(function)
        except (TypeError, ValueError):  # a builtin without a signature: tried below
            continue
        try:
            signature.bind(None, None)
        except TypeError as error:
            raise TypeError(f"metrics[{name!r}] must take two positional arguments "
                            f"(prediction, target), but {signature}: {error}") from None
    for what, (x, y) in [("training", train), *([("validation", valid)] if valid else [])]:
        predictions = predict(carry, x[:rows]) if metrics else []
        for name, function in metrics.items():
            failure = _failure(name, function, predictions, y[:rows])
            if failure is None or (x.shape[0] > rows and _failure(
                    name, function, predict(carry, x), y) is None):
                continue  # fails on the first rows only: every epoch evaluates all of them
            if isinstance(failure, _NotANumber):
                raise TypeError(f"metrics[{name!r}] on the first rows of the {what} data: "
                                f"{failure}") from None
            kind = TypeError if isinstance(failure, TypeError) else ValueError
            raise kind(f"metrics[{name!r}] failed on the first rows of the {what} data (tried "
                       f"before any work): {type(failure).__name__}: {failure}") from failure


class _NotANumber(TypeError):
    """A metric's value that is not a number."""


def _failure(name: str, function: Callable, predictions: list, y) -> Exception | None:
    """What ``function`` raises on one of ``predictions`` (per member) and ``y``, or returns
    that is not a number (a ``_NotANumber``); None when it works."""
    for prediction in predictions:
        try:
            value = function(prediction, y)
        except Exception as error:  # noqa: BLE001 (named and raised by the caller)
            return error
        try:
            _value(name, value)
        except TypeError as error:
            return _NotANumber(str(error))
    return None


class EpochMetrics(Policy):
    """After every epoch: each metric on the training data and on the validation data, per
    member, into ``logs["metrics"]`` (``name`` and ``valid_<name>``); their time adds to
    ``logs["epoch_time"]``.

    Arguments:
        metrics: ``check_metrics``'s dict.
        predict: ``predict(carry, x) -> [prediction per member]`` in evaluation mode.
        train, valid: ``(x, y)`` pairs (``valid`` may be None).
    """

    def __init__(self, metrics: dict[str, Callable], predict: Callable, train: tuple,
                 valid: tuple | None):
        self.metrics, self.predict = metrics, predict
        self.sets = [("", train), *([("valid_", valid)] if valid is not None else [])]

    def on_epoch_end(self, run: Run, logs: dict) -> bool:
        began, values = time.perf_counter(), {}
        for prefix, (x, y) in self.sets:
            predictions = self.predict(run.carry, x)
            for name, function in self.metrics.items():
                values[prefix + name] = [_value(name, function(p, y)) for p in predictions]
        logs["metrics"] = values
        if "epoch_time" in logs:
            logs["epoch_time"] += time.perf_counter() - began
        return False


def _value(name: str, value) -> float:
    try:
        if isinstance(value, bool) or not (isinstance(value, numbers.Real)
                                           or getattr(value, "numel", lambda: 0)() == 1):
            raise TypeError
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"metric {name!r} returned {value!r}; metrics[{name!r}] must return "
                        f"a number, got {type(value).__name__} (a metric is (prediction, "
                        "target) -> float)") from None
