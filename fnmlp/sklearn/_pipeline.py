"""Whole scikit-learn objects (a ``Pipeline`` with a scaler and an fnmlp estimator, a search's
``best_estimator_``) in one file, with ``skops.io`` (scikit-learn's developers' format): a zip of
JSON and NumPy arrays whose loading builds only the types it trusts and runs no pickle.

fnmlp's estimators give skops plain data (``__getstate__``: ``_state``), so a file needs no
trust beyond skops' own (NumPy, SciPy, scikit-learn) and fnmlp's estimator classes
(``trusted_types``). skops is optional: it is imported here, when used.
"""

from __future__ import annotations

import os

from fnmlp._errors import FnmlpError
from fnmlp._files import check_writable, summary, write_atomically, zip_damage

_INSTALL = "pip install skops (or fnmlp[persist])"
_TRUST = ("neither skops trusts by itself (NumPy's and SciPy's types, scikit-learn's "
          "estimators) nor is fnmlp's")


class PipelineFileError(FnmlpError, ValueError):
    """A pipeline file that cannot be loaded: damaged, or holding types no one trusted."""


def trusted_types() -> list[str]:
    """The names of fnmlp's types a pipeline file may hold besides those skops trusts by
    itself: the estimators' classes, as ``skops.io.get_untrusted_types`` names them
    (``skops.io.load(path, trusted=fnmlp.sklearn.trusted_types())`` loads such a file)."""
    from fnmlp.sklearn._estimators import MLPClassifier, MLPRegressor

    return [f"{cls.__module__}.{cls.__qualname__}" for cls in (MLPClassifier, MLPRegressor)]


def save_pipeline(obj, path, *, trusted=()) -> None:
    """Write ``obj`` (a fitted ``Pipeline``, estimator, ...) to ``path`` with ``skops.io``,
    atomically (the previous file stays intact until the new one is complete).

    Arguments:
        obj: any object skops can store; fnmlp's estimators included, hyperparameters
            (``layers``, ``loss``) and fitted network too.
        path: the file to write (its folder must exist); ``.skops`` is skops' suffix.
        trusted: more type names the file may hold (as ``skops.io.get_untrusted_types`` lists
            them), which ``load_pipeline`` must then be given too.

    Raises ``ValueError`` before writing anything when ``obj`` holds another type that loading
    would have to trust (a function passed as ``on_epoch_end``, a search's splitter and
    scorer, a class of one's own), naming it; ``ImportError`` without skops.
    """
    sio = _skops()
    path = check_writable(path, "pipeline file")
    data = sio.dumps(obj)
    others = sorted(set(sio.get_untrusted_types(data=data)) - set(trusted_types())
                    - set(trusted))
    if others:
        raise ValueError(f"cannot save {type(obj).__name__} safely: it holds {', '.join(others)}"
                         f", which {_TRUST} (a function such as on_epoch_end: set it to None; a "
                         "search: save its best_estimator_; a type you trust: pass trusted=[...] "
                         "here and to load_pipeline)")
    write_atomically(path, lambda file, temporary: file.write(data), "pipeline file")


def load_pipeline(path, *, trusted=()):
    """The object ``save_pipeline`` wrote to ``path``, ready to predict (in any process: fnmlp
    and scikit-learn imported, nothing else needed).

    Arguments:
        path: the file.
        trusted: more type names you trust (as ``skops.io.get_untrusted_types`` lists them)
            for a file written by ``skops.io.dump`` that holds types of your own.

    Loading builds only the types skops trusts by default, fnmlp's estimators
    (``trusted_types``) and ``trusted``; a file holding any other raises
    ``PipelineFileError`` naming them, before anything is built. The file is read once: the
    bytes whose types were checked are the bytes loaded. A truncated or corrupted file
    raises ``PipelineFileError`` too.

    A loaded pipeline writes no file until you set ``checkpoint=`` again: the hyperparameters
    that make ``fit`` write or read a file of their choosing (``checkpoint``, ``resume``; see
    ``FILE_OPTIONS``) are set back to their defaults (None, False) in every fnmlp estimator
    the object holds (a pipeline's steps, a column transformer's, a search's
    ``best_estimator_``, fitted or not), so that a file cannot choose where a later ``fit``
    writes. Pickles keep them (unpickling restores what you pickled).
    """
    sio = _skops()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with open(path, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    allowed = set(trusted_types()) | set(trusted)
    try:
        untrusted = sio.get_untrusted_types(data=data)
    except Exception as error:  # a broken zip, bad JSON, a foreign file
        damage = zip_damage(path, error, data=data)
        raise PipelineFileError(f"{path}: {damage}" if damage is not None else
                                f"{path}: not a readable skops file ({summary(error)})") from None
    others = sorted(set(untrusted) - allowed)
    if others:
        raise PipelineFileError(f"{path}: holds {', '.join(others)}, which {_TRUST}; if you "
                                "trust the file, pass them as trusted=[...]")
    try:
        loaded = sio.loads(data, trusted=sorted(set(untrusted)))
    except Exception as error:
        damage = zip_damage(path, error, data=data)
        if damage is not None:
            raise PipelineFileError(f"{path}: {damage}") from None
        raise
    reset_file_options(loaded)
    return loaded


# the hyperparameters of fnmlp's estimators that make fit write (or resume from) a file at a
# path they name, and their defaults (the constructors'), which a loaded file's are set back to
FILE_OPTIONS = {"checkpoint": None, "resume": False}


def reset_file_options(obj) -> None:
    """Set ``FILE_OPTIONS`` back to their defaults in every fnmlp estimator in ``obj``: itself,
    and any found through lists, tuples, dicts and the attributes of scikit-learn objects
    (a pipeline's ``steps``, a column transformer's ``transformers`` and fitted
    ``transformers_``, a search's ``estimator`` and ``best_estimator_``, ...)."""
    from fnmlp.sklearn._base import BaseMLP

    seen: set[int] = set()
    pending = [obj]
    while pending:
        item = pending.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, BaseMLP):
            for name, default in FILE_OPTIONS.items():
                setattr(item, name, default)
        if isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
        elif hasattr(item, "get_params") and hasattr(item, "__dict__"):
            pending.extend(vars(item).values())


def _skops():
    try:
        import skops.io
    except ImportError as error:
        raise ImportError(f"saving and loading whole pipelines needs skops: {_INSTALL}") \
            from error
    return skops.io
