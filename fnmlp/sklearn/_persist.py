"""Saving a fitted estimator in ``fnmlp.save``'s format (no pickle: a checkpoint with the
estimator's hyperparameters and fitted attributes as plain JSON metadata)."""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from sklearn.preprocessing import LabelBinarizer
from sklearn.utils.validation import check_is_fitted

from fnmlp import interop
from fnmlp.nn import Loss

_FITTED = ("n_iter_", "t_", "loss_", "loss_curve_", "best_loss_", "validation_scores_",
           "best_validation_score_", "n_features_in_", "n_outputs_", "n_layers_",
           "out_activation_", "_steps", "_dropout_seed", "_no_improvement_count")


def save(estimator, path) -> None:
    """Write the fitted ``estimator`` to ``path`` (atomically; see ``fnmlp.save``)."""
    check_is_fitted(estimator)
    hyper = dict(estimator.get_params(deep=False))
    if hyper["layers"] is not None:  # the hidden primitives of the fitted network
        hyper["layers"] = [interop.encode_spec(p) for p in estimator.model_.layers[:-1]]
    if isinstance(hyper["loss"], Loss):
        hyper["loss"] = {"spec": interop.encode_spec(hyper["loss"])}
    hyper["dtype"] = None if hyper["dtype"] is None else str(hyper["dtype"]).replace("torch.", "")
    hyper["device"] = str(hyper["device"])
    hyper["on_epoch_end"] = None  # a function is not data
    hyper["checkpoint"] = None if hyper["checkpoint"] is None else os.fspath(hyper["checkpoint"])
    if not (hyper["random_state"] is None or isinstance(hyper["random_state"], int)):
        hyper["random_state"] = None  # a RandomState object is not data
    if isinstance(hyper["hidden_layer_sizes"], (tuple, list, np.ndarray)):
        hyper["hidden_layer_sizes"] = [int(s) for s in hyper["hidden_layer_sizes"]]
    fitted = {name: _plain(getattr(estimator, name)) for name in _FITTED
              if hasattr(estimator, name)}  # lbfgs keeps no loss curve
    if hasattr(estimator, "feature_names_in_"):
        fitted["feature_names_in_"] = [str(n) for n in estimator.feature_names_in_]
    if hasattr(estimator, "_label_binarizer"):
        binarizer = estimator._label_binarizer
        fitted["classes"] = {"values": binarizer.classes_.tolist(),
                             "dtype": binarizer.classes_.dtype.str,
                             "y_type": binarizer.y_type_}
    interop.save(path, estimator.model_, estimator.params_, state=estimator.state_,
                     opt_state=estimator._opt_state, optimizer=estimator._optimizer(),
                     metadata={"sklearn": {"estimator": type(estimator).__name__,
                                           "params": hyper, "fitted": fitted}})


def load(path, *, map_location=None):
    """The estimator ``save`` wrote to ``path``, ready to predict or continue training."""
    from fnmlp.sklearn._estimators import MLPClassifier, MLPRegressor

    checkpoint = interop.load(path, map_location=map_location)
    meta = checkpoint.metadata.get("sklearn")
    classes = {"MLPRegressor": MLPRegressor, "MLPClassifier": MLPClassifier}
    if not isinstance(meta, dict) or meta.get("estimator") not in classes:
        raise interop.CheckpointError(f"{path}: an fnmlp checkpoint, but not of a "
                                          "scikit-learn estimator (use fnmlp.load)")
    hyper = dict(meta["params"])
    if hyper["layers"] is not None:
        hyper["layers"] = [interop.decode_spec(p) for p in hyper["layers"]]
    if isinstance(hyper["loss"], dict):
        hyper["loss"] = interop.decode_spec(hyper["loss"]["spec"])
    if isinstance(hyper["hidden_layer_sizes"], list):
        hyper["hidden_layer_sizes"] = tuple(hyper["hidden_layer_sizes"])
    if map_location is not None:
        hyper["device"] = str(torch.device(map_location))
    estimator = classes[meta["estimator"]](**hyper)
    fitted = meta["fitted"]
    for name in (name for name in _FITTED if name in fitted):
        value = fitted[name]
        if name in ("best_loss_", "best_validation_score_") and isinstance(value, str):
            value = float(value)
        setattr(estimator, name, value)
    if "feature_names_in_" in fitted:
        estimator.feature_names_in_ = np.asarray(fitted["feature_names_in_"], dtype=object)
    if "classes" in fitted:
        binarizer = LabelBinarizer()
        binarizer.classes_ = np.asarray(fitted["classes"]["values"],
                                        dtype=np.dtype(fitted["classes"]["dtype"]))
        binarizer.y_type_ = fitted["classes"]["y_type"]
        binarizer.sparse_input_ = False
        estimator._label_binarizer, estimator.classes_ = binarizer, binarizer.classes_
    estimator.model_, estimator.params_ = checkpoint.model, checkpoint.params
    estimator.state_, estimator._opt_state = checkpoint.state, checkpoint.opt_state
    return estimator


def _plain(value):
    """JSON data for a fitted attribute (infinities as strings, NumPy scalars as Python's)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else str(value)
    if isinstance(value, np.integer):
        return int(value)
    return value
