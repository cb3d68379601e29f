"""``fnmlp.fit`` and ``fnmlp.train_step``: the entry points, routed by the kind of model.

Routing lives here, at the top of the package, so that no lower layer imports a higher one: an
``MLP`` trains through ``fnmlp.train`` (on data-parallel ranks with ``distributed=True``), an
``Ensemble`` through ``Ensemble.fit``/``Ensemble.train_step``; anything else is refused.
"""

from __future__ import annotations

from fnmlp import train
from fnmlp.ensemble import Ensemble
from fnmlp.nn import MLP


def _check_model(model) -> None:
    if not isinstance(model, (MLP, Ensemble)):
        raise TypeError(f"model must be an fnmlp.MLP or fnmlp.Ensemble, got "
                        f"{type(model).__name__}; a torch.nn module converts with "
                        "fnmlp.from_torch(module)")


def fit(model, params, x, y, *, distributed: bool = False, callbacks=None, metrics=None,
        **options):
    """Train ``params`` of ``model`` on (x, y); returns a ``FitResult`` (an ``EnsembleFitResult``
    for an ensemble).

    An ``fnmlp.MLP`` trains as ``fnmlp.train.fit`` describes (its options: ``epochs``,
    ``batch_size``, ``optimizer``, ``loss``, ``valid``, ``checkpoint``, ...); with
    ``distributed=True``, data-parallel over the ranks ``torchrun`` started
    (``fnmlp.distributed.DataParallel``). An ``fnmlp.Ensemble`` and its stacked parameters
    train every member at once (``Ensemble.fit``: the same options, plus per-member rates,
    weight decays and bagging).

    Arguments:
        callbacks: a list of ``fnmlp.callbacks.Callback`` (``CSVLogger``, ``TensorBoard``,
            ``ReduceLROnPlateau``, your own), called around the fit, each epoch and each batch.
        metrics: ``{"r2": fnmlp.metrics.r2, ...}``: functions ``(prediction, target) ->
            float`` evaluated each epoch on the training data (``r2`` in the logs) and on
            ``valid`` (``valid_r2``).
    """
    _check_model(model)
    options.update(callbacks=callbacks, metrics=metrics)
    if isinstance(model, Ensemble):
        if distributed:
            raise ValueError("distributed=True trains one network; an Ensemble trains its "
                             "members in one process")
        return model.fit(params, x, y, **options)
    if distributed:
        from fnmlp.distributed import DataParallel

        return train.fit(model, params, x, y, strategy=DataParallel(), **options)
    return train.fit(model, params, x, y, **options)


def train_step(model, loss, optimizer, **options):
    """The pure training step of ``model``: ``fnmlp.train.train_step`` for an ``MLP``,
    ``Ensemble.train_step`` (every member in one call) for an ``Ensemble``."""
    _check_model(model)
    if isinstance(model, Ensemble):
        return model.train_step(loss, optimizer, **options)
    return train.train_step(model, loss, optimizer, **options)
