"""Whole pipelines (a scaler and an fnmlp estimator, a grid search's best) saved with skops and
loaded in a fresh process, safely; pickles of the estimators hold no torch object."""

import io
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import skops.io
import torch
from sklearn.datasets import load_diabetes, load_iris
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

import fnmlp
import fnmlp.sklearn
from fnmlp.sklearn import MLPClassifier, MLPRegressor

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
ROOT = Path(__file__).resolve().parents[2]


def _iris():
    x, y = load_iris(return_X_y=True)
    return x, np.array(["setosa", "versicolor", "virginica"])[y]


def _classifier_search():
    x, y = _iris()
    pipe = Pipeline([("scale", StandardScaler()),
                     ("net", MLPClassifier(max_iter=30, random_state=0, learning_rate_init=0.01))])
    return GridSearchCV(pipe, {"net__hidden_layer_sizes": [(4,), (8,)]}, cv=2).fit(x, y), x


def _regressor_pipeline():
    x, y = load_diabetes(return_X_y=True)
    pipe = Pipeline([("scale", StandardScaler()), ("net", MLPRegressor(
        layers=[fnmlp.Dense(16, "gelu", layer_norm=True), fnmlp.BatchNorm(), "tanh"],
        loss=fnmlp.Huber(delta=2.0), solver="adamw", max_iter=5, batch_size=64,
        dtype="float32", random_state=0))])
    return pipe.fit(x, y / 100), x


def _in_a_fresh_process(path: Path, x: np.ndarray, tmp_path: Path, methods: list[str]):
    """What ``load_pipeline(path)`` predicts for ``x`` in a new Python process (nothing of
    this one shared: no fnmlp class registered, no estimator in memory)."""
    np.save(tmp_path / "x.npy", x)
    script = textwrap.dedent(f"""
        import numpy as np
        import fnmlp.sklearn
        pipe = fnmlp.sklearn.load_pipeline({str(path)!r})
        x = np.load({str(tmp_path / "x.npy")!r})
        for method in {methods!r}:
            np.save({str(tmp_path)!r} + f"/{{method}}.npy", getattr(pipe, method)(x))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return {method: np.load(tmp_path / f"{method}.npy", allow_pickle=method == "predict")
            for method in methods}


def test_a_grid_searchs_best_pipeline_loads_in_a_fresh_process_and_predicts_the_same(
        tmp_path):
    search, x = _classifier_search()
    best = search.best_estimator_  # the whole pipeline: scaler + classifier
    path = tmp_path / "iris.skops"
    fnmlp.sklearn.save_pipeline(best, path)
    assert skops.io.get_untrusted_types(file=path) == fnmlp.sklearn.trusted_types()[:1]
    fresh = _in_a_fresh_process(path, x, tmp_path, ["predict", "predict_proba"])
    np.testing.assert_array_equal(fresh["predict"], best.predict(x))  # unscaled data in
    np.testing.assert_array_equal(fresh["predict_proba"], best.predict_proba(x))
    plain = skops.io.load(path, trusted=fnmlp.sklearn.trusted_types())  # skops' own call
    np.testing.assert_array_equal(plain.predict_proba(x), best.predict_proba(x))
    assert plain[-1].get_params() == best[-1].get_params()


def test_a_regressor_pipeline_with_an_fnmlp_spec_loads_in_a_fresh_process(tmp_path):
    pipe, x = _regressor_pipeline()
    path = tmp_path / "diabetes.skops"
    fnmlp.sklearn.save_pipeline(pipe, path)
    fresh = _in_a_fresh_process(path, x, tmp_path, ["predict"])
    np.testing.assert_array_equal(fresh["predict"], pipe.predict(x))
    back = fnmlp.sklearn.load_pipeline(path)
    assert back[-1].get_params() == pipe[-1].get_params()  # layers and loss: fnmlp specs
    assert back[-1].model_ == pipe[-1].model_
    x_scaled = back[0].transform(x)
    y = load_diabetes(return_X_y=True)[1] / 100
    pipe[-1].partial_fit(x_scaled, y)  # continues: the optimizer state came back too
    back[-1].partial_fit(x_scaled, y)
    np.testing.assert_array_equal(back.predict(x), pipe.predict(x))


class _NoTorch(pickle.Unpickler):
    """Refuses any class of torch's: a pickle of an estimator must hold none."""

    def find_class(self, module, name):
        if module.partition(".")[0] == "torch":
            raise AssertionError(f"the pickle holds {module}.{name}")
        return super().find_class(module, name)


def test_pickles_of_estimators_and_pipelines_round_trip_without_torch_objects():
    search, x = _classifier_search()
    best = search.best_estimator_
    again = _NoTorch(io.BytesIO(pickle.dumps(best))).load()
    np.testing.assert_array_equal(again.predict_proba(x), best.predict_proba(x))
    assert again[-1].get_params() == best[-1].get_params()
    _, y = _iris()
    scaled = best[0].transform(x)
    again[-1].partial_fit(scaled, y)  # the optimizer state is back, bit for bit
    best[-1].partial_fit(scaled, y)
    np.testing.assert_array_equal(again.predict_proba(x), best.predict_proba(x))
    regressor, x = _regressor_pipeline()
    copy = _NoTorch(io.BytesIO(pickle.dumps(regressor))).load()
    assert copy[-1].get_params() == regressor[-1].get_params()
    np.testing.assert_array_equal(copy.predict(x), regressor.predict(x))


def test_an_older_pickles_state_with_torch_objects_still_loads():
    search, x = _classifier_search()
    net = search.best_estimator_[-1]
    older = dict(net.__dict__)  # what BaseEstimator.__getstate__ gave before
    back = MLPClassifier.__new__(MLPClassifier)
    back.__setstate__(older)  # as pickles written before the plain state unpickle
    scaled = search.best_estimator_[0].transform(x)
    np.testing.assert_array_equal(back.predict_proba(scaled), net.predict_proba(scaled))


def _callback(iteration, logs):
    return False


def _log1p(x):
    return np.log1p(x)


def test_what_loading_would_have_to_trust_is_refused_by_name(tmp_path):
    pipe, x = _regressor_pipeline()
    pipe[-1].set_params(on_epoch_end=_callback)
    path = tmp_path / "callback.skops"
    with pytest.raises(ValueError, match=rf"holds {__name__}\._callback, which neither skops "
                                         "trusts .*on_epoch_end: set it to None"):
        fnmlp.sklearn.save_pipeline(pipe, path)
    assert not path.exists()
    pipe[-1].set_params(on_epoch_end=None)
    custom = Pipeline([("log", FunctionTransformer(_log1p)), ("net", pipe[-1])])
    path = tmp_path / "custom.skops"
    skops.io.dump(custom, path)  # written by skops itself: loading must trust _log1p
    name = f"{__name__}._log1p"
    with pytest.raises(fnmlp.sklearn.PipelineFileError,
                       match=rf"holds {name}, which neither skops trusts"):
        fnmlp.sklearn.load_pipeline(path)
    with pytest.raises(ValueError, match=rf"holds {name}, which"):
        fnmlp.sklearn.save_pipeline(custom, tmp_path / "refused.skops")
    fnmlp.sklearn.save_pipeline(custom, path, trusted=[name])
    back = fnmlp.sklearn.load_pipeline(path, trusted=[name])  # trusted explicitly
    np.testing.assert_array_equal(back.predict(np.abs(x)), custom.predict(np.abs(x)))


def test_a_damaged_pipeline_file_says_so(tmp_path):
    search, _ = _classifier_search()
    path = tmp_path / "iris.skops"
    fnmlp.sklearn.save_pipeline(search.best_estimator_, path)
    data = path.read_bytes()
    cut = tmp_path / "cut.skops"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(fnmlp.sklearn.PipelineFileError, match=f"{cut}: truncated"):
        fnmlp.sklearn.load_pipeline(cut)
    flipped = tmp_path / "flipped.skops"
    damaged = bytearray(data)
    damaged[len(data) // 3] ^= 0x01
    flipped.write_bytes(bytes(damaged))
    with pytest.raises(fnmlp.sklearn.PipelineFileError, match=f"{flipped}: corrupted"):
        fnmlp.sklearn.load_pipeline(flipped)
    with pytest.raises(FileNotFoundError, match="no such file"):
        fnmlp.sklearn.load_pipeline(tmp_path / "missing.skops")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fnmlp.sklearn.save_pipeline(search.best_estimator_, tmp_path / "nowhere" / "a.skops")


def test_skops_stays_optional_and_its_absence_is_named(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "skops", None)
    monkeypatch.setitem(sys.modules, "skops.io", None)
    with pytest.raises(ImportError, match="pip install skops"):
        fnmlp.sklearn.save_pipeline(StandardScaler(), tmp_path / "a.skops")
    with pytest.raises(ImportError, match="pip install skops"):
        fnmlp.sklearn.load_pipeline(tmp_path / "a.skops")
    assert not list(tmp_path.iterdir())


def test_the_file_is_read_once_so_a_file_swapped_in_meanwhile_is_not_loaded(tmp_path,
                                                                           monkeypatch):
    """The types checked and the object built come from the same bytes: a file put in place
    of the checked one after the check is not what ``load_pipeline`` returns."""
    pipe, x = _regressor_pipeline()
    path, other = tmp_path / "pipe.skops", tmp_path / "other.skops"
    fnmlp.sklearn.save_pipeline(pipe, path)
    fnmlp.sklearn.save_pipeline(StandardScaler().fit(x), other)
    check = skops.io.get_untrusted_types

    def check_then_swap(**kwargs):
        found = check(**kwargs)
        os.replace(other, path)  # another writer, between the check and the load
        return found

    monkeypatch.setattr(skops.io, "get_untrusted_types", check_then_swap)
    back = fnmlp.sklearn.load_pipeline(path)
    assert isinstance(back, Pipeline)
    np.testing.assert_array_equal(back.predict(x), pipe.predict(x))


def _fnmlp_estimators(obj) -> list:
    """Every fnmlp estimator a loaded object holds, fitted clones too."""
    from sklearn.base import BaseEstimator

    found, pending, seen = [], [obj], set()
    while pending:
        item = pending.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, (MLPRegressor, MLPClassifier)):
            found.append(item)
        if isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
        elif isinstance(item, BaseEstimator):
            pending.extend(vars(item).values())
    return found


def test_a_loaded_pipeline_writes_no_file_until_checkpoint_is_set_again(tmp_path):
    """A file cannot choose where a later fit writes or what it resumes from: loading sets
    ``checkpoint`` and ``resume`` back to their defaults in every fnmlp estimator the object
    holds (a pipeline's steps, a meta-estimator's parameters and fitted clones); saving keeps
    them, and so does a pickle (which restores what its user pickled)."""
    from sklearn.compose import TransformedTargetRegressor
    from sklearn.ensemble import VotingRegressor

    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((60, 3)), rng.standard_normal(60)
    chosen = tmp_path / "chosen"
    chosen.mkdir()

    def net(name):
        return MLPRegressor(hidden_layer_sizes=(4,), max_iter=2, random_state=0,
                            checkpoint=chosen / f"{name}.fnmlp")

    obj = Pipeline([("scale", StandardScaler()), ("vote", VotingRegressor([
        ("a", net("a")),
        ("b", TransformedTargetRegressor(regressor=Pipeline([("net", net("b"))]))),
    ]))]).fit(x, y)
    saved = _fnmlp_estimators(obj)
    assert len(saved) == 5  # a, b, their fitted clones and the regressor of b's clone
    for estimator in saved:
        estimator.set_params(resume=True)
    path, bunch = tmp_path / "chosen.skops", ["sklearn.utils._bunch.Bunch"]  # VotingRegressor's
    fnmlp.sklearn.save_pipeline(obj, path, trusted=bunch)
    for file in chosen.iterdir():
        file.unlink()
    back = fnmlp.sklearn.load_pipeline(path, trusted=bunch)
    loaded = _fnmlp_estimators(back)
    assert len(loaded) == 5
    for estimator in loaded:
        assert estimator.checkpoint is None and estimator.resume is False
        assert estimator.get_params()["checkpoint"] is None
    np.testing.assert_array_equal(back.predict(x), obj.predict(x))
    back.fit(x, y)
    for estimator in loaded:
        if hasattr(estimator, "params_"):
            estimator.partial_fit(x, y)
    assert not list(chosen.iterdir())  # nothing written where the file said
    assert all(e.checkpoint is not None and e.resume for e in _fnmlp_estimators(obj))
    from fnmlp.sklearn._pipeline import FILE_OPTIONS

    for cls in (MLPRegressor, MLPClassifier):  # the constructors' defaults
        assert {name: cls().get_params()[name] for name in FILE_OPTIONS} == FILE_OPTIONS
    single = fnmlp.sklearn.load_pipeline(_saved(net("c").fit(x, y), tmp_path / "c.skops"))
    assert single.checkpoint is None and single.resume is False
    pickled = pickle.loads(pickle.dumps(obj))
    assert all(e.checkpoint is not None and e.resume for e in _fnmlp_estimators(pickled))


def _saved(obj, path):
    fnmlp.sklearn.save_pipeline(obj, path)
    return path


def test_a_dtype_named_by_a_file_is_looked_up_in_a_fixed_table_and_imports_nothing():
    """A state's dtype names (a dtype value, a tensor's dtype) are looked up among the dtypes
    fnmlp restores, not as ``torch`` attributes: torch's ``__getattr__`` imports submodules
    by name. In a fresh process, so that neither module is imported already."""
    script = textwrap.dedent("""
        import json, sys
        import numpy as np
        from fnmlp.sklearn import _state

        def restored(name, as_tensor):
            meta = {"t": {"dtype": name, "shape": [1], "device": "cpu"}}
            info = ({"kinds": {}, "arrays": {"t": np.zeros(1)}, "tensors": json.dumps(meta)}
                    if as_tensor else {"kinds": {"dtype": "dtype"}, "arrays": {},
                                       "tensors": "{}"})
            try:
                _state.restore_state({"dtype": name, _state.KEY: {"format": 1, **info}})
            except ValueError as error:
                return str(error)
            return None

        names = ["onnx", "_dynamo", "nn", "Tensor", "float8_e4m3fn", "int64", 3]
        print(json.dumps({
            "value": [restored(name, False) for name in names],
            "tensor": [restored(name, True) for name in names],
            "imported": [m for m in ("torch.onnx", "torch._dynamo") if m in sys.modules],
            "float32": str(_state.restore_state({"dtype": "float32", _state.KEY: {
                "format": 1, "kinds": {"dtype": "dtype"}, "arrays": {}, "tensors": "{}"}})[
                "dtype"]),
        }))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    import json

    found = json.loads(done.stdout.splitlines()[-1])
    assert found["imported"] == []
    assert found["float32"] == "torch.float32"
    for error in found["value"]:  # int64 is no dtype fnmlp computes in
        assert error is not None and error.startswith("not a dtype fnmlp restores: ")
        assert "(one of float16, bfloat16, float32, float64)" in error
    assert found["tensor"][-2] is None  # an int64 tensor (a step count) is restored
    for error in found["tensor"][:-2] + found["tensor"][-1:]:
        assert error is not None and error.startswith("not a dtype fnmlp restores: ")


def test_an_estimator_state_refuses_to_store_a_tensor_it_could_not_restore():
    from fnmlp.sklearn import _state

    with pytest.raises(ValueError, match=r"w is a tensor of torch.float8_e4m3fn, which an "
                                         r"estimator's state cannot hold"):
        _state.plain_state({"w": torch.zeros(2, dtype=torch.float8_e4m3fn)})
    ones = torch.ones(2, dtype=torch.bfloat16)
    back = _state.restore_state(_state.plain_state({"w": ones, "dtype": torch.bfloat16}))
    assert back["dtype"] is torch.bfloat16 and torch.equal(back["w"], ones)
