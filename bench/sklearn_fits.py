"""``python bench/run.py --workload sklearn``: fnmlp.sklearn against sklearn.neural_network,
whole fits side by side on the same data and hyperparameters.

For each data set: test score (R² or accuracy) as mean ± std over seeds, and fit wall time
(median over seeds; fnmlp's compiled fits include compiling, the first one in a fresh process
too), the two libraries' fits alternating so that machine noise hits both alike.
"""

from __future__ import annotations

import statistics
import time
import warnings

import numpy as np
from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits, make_regression
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

import fnmlp.sklearn as fnmlp_sklearn


def _split(x, y, seed: int, dtype=np.float64):
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=seed)
    scaler = StandardScaler().fit(x_train)
    return (scaler.transform(x_train).astype(dtype), scaler.transform(x_test).astype(dtype),
            y_train, y_test)


def _synthetic(rows: int):
    x, y = make_regression(n_samples=rows * 4 // 3, n_features=32, n_informative=16,
                           noise=1.0, random_state=0)
    return x, (y / y.std())


def data_sets(quick: bool):
    """name -> (loader, regression?, dtype, hyperparameters, fnmlp-only hyperparameters)."""
    rows = 4_000 if quick else 200_000
    return {
        "diabetes": (lambda: load_diabetes(return_X_y=True), True, np.float64,
                     {"hidden_layer_sizes": (100,), "max_iter": 500}, {}),
        "digits": (lambda: load_digits(return_X_y=True), False, np.float64,
                   {"hidden_layer_sizes": (100,), "max_iter": 200}, {}),
        "breast_cancer": (lambda: load_breast_cancer(return_X_y=True), False, np.float64,
                          {"hidden_layer_sizes": (100,), "max_iter": 200}, {}),
        f"synthetic {rows // 1000}k train x 32 (float32)": (
            lambda: _synthetic(rows), True, np.float32,
            {"hidden_layer_sizes": (100,), "max_iter": 20, "tol": 0.0}, {"compile": True}),
    }


def run(quick: bool = False, seeds: int = 5) -> dict:
    """The figures, one entry per data set (the synthetic set: 200 000 rows to train on)."""
    results = []
    for name, (load, regression, dtype, hyper, ours_only) in data_sets(quick).items():
        if quick:  # a smoke run: a few epochs
            hyper = {**hyper, "max_iter": 3}
        x, y = load()
        if regression and name == "diabetes":
            y = y / 100
        figures = {"fnmlp": ([], []), "sklearn": ([], [])}
        for seed in range(seeds if not quick else 2):
            x_train, x_test, y_train, y_test = _split(x, y, seed, dtype)
            for library in ("fnmlp", "sklearn") if seed % 2 == 0 else ("sklearn", "fnmlp"):
                estimator = _estimator(library, regression, {**hyper, "random_state": seed},
                                       ours_only)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    start = time.perf_counter()
                    estimator.fit(x_train, y_train)
                    seconds = time.perf_counter() - start
                figures[library][0].append(estimator.score(x_test, y_test))
                figures[library][1].append(seconds)
        results.append({
            "data": name, "rows": len(x), "score": "R²" if regression else "accuracy",
            "hyperparameters": {k: str(v) for k, v in {**hyper, **ours_only}.items()},
            **{library: {"score_mean": statistics.mean(scores),
                         "score_std": statistics.pstdev(scores),
                         "fit_s_median": statistics.median(times), "fit_s": times}
               for library, (scores, times) in figures.items()},
        })
        results[-1]["speedup"] = (results[-1]["sklearn"]["fit_s_median"]
                                  / results[-1]["fnmlp"]["fit_s_median"])
    return {"workload": "sklearn", "results": results}


def _estimator(library: str, regression: bool, hyper: dict, ours_only: dict):
    if library == "fnmlp":
        cls = fnmlp_sklearn.MLPRegressor if regression else fnmlp_sklearn.MLPClassifier
        return cls(**hyper, **ours_only)
    from sklearn.neural_network import MLPClassifier, MLPRegressor

    return (MLPRegressor if regression else MLPClassifier)(**hyper)


def format_result(result: dict) -> str:
    lines = ["\n== sklearn: fnmlp.sklearn vs sklearn.neural_network, whole fits "
             "(default hyperparameters unless listed; scores on a 25% test split)",
             f"{'data':<30} {'score':>8} {'fnmlp':>16} {'sklearn':>16} {'fnmlp fit':>10} "
             f"{'sklearn fit':>12} {'speed-up':>9}"]
    for r in result["results"]:
        ours, theirs = r["fnmlp"], r["sklearn"]
        lines.append(
            f"{r['data']:<30} {r['score']:>8} "
            f"{ours['score_mean']:>9.4f} ± {ours['score_std']:.4f} "
            f"{theirs['score_mean']:>9.4f} ± {theirs['score_std']:.4f} "
            f"{ours['fit_s_median']:>9.2f}s {theirs['fit_s_median']:>11.2f}s "
            f"{r['speedup']:>8.2f}x")
    return "\n".join(lines)
