"""scikit-learn estimators trained by fnmlp: ``MLPRegressor`` and ``MLPClassifier`` take
``sklearn.neural_network``'s parameters (and fnmlp's ``layers``, ``dtype``, ``device``,
``compile``, ``loss``) and work in pipelines, grid searches and pickles.

    from fnmlp.sklearn import MLPRegressor
    model = make_pipeline(StandardScaler(), MLPRegressor(hidden_layer_sizes=(64, 64)))
    model.fit(X, y).score(X_test, y_test)

``estimator.save(path)`` and ``fnmlp.sklearn.load(path)`` use ``fnmlp.save``'s format;
``save_pipeline(obj, path)`` and ``load_pipeline(path)`` store a whole pipeline (scaler
included) with skops, safely (no pickle runs when loading).
"""

from fnmlp.sklearn._estimators import MLPClassifier, MLPRegressor
from fnmlp.sklearn._persist import load
from fnmlp.sklearn._pipeline import (PipelineFileError, load_pipeline, save_pipeline,
                                     trusted_types)

__all__ = ["MLPRegressor", "MLPClassifier", "load", "save_pipeline", "load_pipeline",
           "trusted_types", "PipelineFileError"]
