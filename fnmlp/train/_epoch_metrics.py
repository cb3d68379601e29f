"""A fit's metrics (``fit(..., metrics={"r2": fnmlp.metrics.r2})``): each epoch, in evaluation
mode, on the training data (``r2``) and the validation data (``valid_r2``)."""

from __future__ import annotations

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
        raise TypeError(f"metric {name!r} returned {value!r}; a metric returns a float "
                        "(prediction, target) -> float") from None
