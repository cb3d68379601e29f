"""Callbacks that write each epoch's logs: ``CSVLogger`` (a CSV file) and ``TensorBoard``
(event files through ``torch.utils.tensorboard``). Both run on the lead process only and
continue their output when a checkpointed fit resumes."""

from __future__ import annotations

import csv
import errno
import numbers
import os
import warnings
from typing import Any, cast

from fnmlp._files import check_writable
from fnmlp.train._callbacks import Callback


def _check_path(path, what: str) -> str:
    """``path`` as a string, or a TypeError naming ``what`` before any work."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{what} must be a path, got {type(path).__name__}")
    return os.fspath(path)


def flat_logs(logs: dict) -> dict:
    """``logs`` with a list (an ensemble's per-member values) spread into ``name_0``,
    ``name_1``, ...; ``epoch`` first."""
    flat = {}
    for name, value in logs.items():
        if isinstance(value, (list, tuple)):
            flat.update({f"{name}_{k}": item for k, item in enumerate(value)})
        else:
            flat[name] = value
    return flat


_SHARED = ("epoch", "epoch_time", "samples_per_s")  # one value per fit, not per member


def log_columns(log_keys, members: int, spread: bool) -> list[str]:
    """The CSV columns of epoch logs with these keys: per-member values spread as
    ``name_0..name_{K-1}`` when ``spread`` (an ensemble, of one member too)."""
    return [column for key in log_keys
            for column in ([key] if key in _SHARED or not spread
                           else [f"{key}_{k}" for k in range(members)])]


class CSVLogger(Callback):
    """One CSV row per epoch, under a header of the log keys (an ensemble's per-member values
    in columns ``train_loss_0``, ``train_loss_1``, ...), flushed each epoch.

    ``append=True`` with an existing, non-empty file whose header is not this fit's columns
    (a fit that adds ``valid_loss`` or metrics, another program's file) is refused before any
    work with a ValueError: log to another path, or pass ``append=False``.

    A resumed fit (``resume=True`` from a checkpoint) keeps the rows up to the checkpoint and
    appends after them (rows written after it, by the killed fit, are dropped: each epoch
    appears once). The checkpoint keeps the file's path, header and size at that point; the
    file is cut back only when it is that file, at least that long, under that header.
    Otherwise (another path, a file shortened, replaced or gone since) a warning says why and
    the rows are appended to the file as it is (or a new one is started). When the resumed
    fit's columns are not the header the rows would go under (its metrics changed, another
    file), a warning says so and its rows start under a new header line of its own columns:
    no column is dropped. A row whose keys are not the header's (a callback added a key
    later) is written under the header with a warning, once per fit, naming the columns it
    lacks or adds.

    Arguments:
        path: the CSV file; its folder must exist and be writable (checked when made).
        append: add to an existing file (under its header, which must be this fit's
            columns) rather than overwriting it.
    """

    lead_only = True

    def __init__(self, path, append: bool = False):
        self.path = check_writable(_check_path(path, "CSVLogger's path"), "log file")
        if not isinstance(append, bool):
            raise TypeError(f"append must be True or False, got {append!r}")
        self.append = append
        self.fields: list[str] | None = None  # the header the rows go under now
        self._first: list[str] | None = None  # the file's first line (its header)
        self._file: Any = None
        self._writer: Any = None
        self._saved: dict | None = None  # the state a resumed fit gave back
        self._rows = 0  # rows this fit wrote
        self._warned = False  # a row's keys not the header's: said once per fit

    def check(self, log_keys: list[str], members: int) -> None:
        """Refuse ``append=True`` to an existing, non-empty file under another header."""
        header = _header(self.path) if self.append else None
        if header is None:
            return
        spreads = (False, True) if members == 1 else (True,)  # one network, or an ensemble
        columns = [log_columns(log_keys, members, spread) for spread in spreads]
        if header not in columns:
            raise ValueError(
                f"CSVLogger {self.path}: append=True would add this fit's rows, columns "
                f"{','.join(columns[-1] if members > 1 else columns[0])}, under the file's "
                f"header {','.join(header)}, losing columns; log to another path, or pass "
                "append=False to start the file anew")

    def on_train_begin(self, logs: dict) -> None:
        saved, self._saved = self._saved, None
        self._rows, self._warned = 0, False
        cut = None if saved is None else self._cut_back(saved)
        if cut is not None:  # the rows up to the checkpoint
            saved = cast(dict, saved)
            self.fields = saved["fields"]
            self._first = saved.get("header", self.fields)
            self._file = open(self.path, "r+", newline="", encoding="utf-8")
            self._file.truncate(cut)
            self._file.seek(cut)
        elif self.append or logs.get("resumed") or saved is not None:
            self.fields = self._first = _header(self.path)
            self._file = open(self.path, "a", newline="", encoding="utf-8")
        else:
            self.fields = self._first = None
            self._file = open(self.path, "w", newline="", encoding="utf-8")
        self._writer = csv.writer(self._file)

    def _cut_back(self, saved: dict) -> int | None:
        """The size to cut the file back to for a resumed fit: the checkpoint's, when the file
        is the one it logged to, at least that long and under its header; else None, with a
        warning saying why (the rows are then appended to the file as it is)."""
        path, size, fields = saved.get("path"), saved.get("size"), saved.get("fields")
        here = os.path.abspath(self.path)
        if path != here:
            why = f"the checkpoint's log is {path}, not this file"
        elif not os.path.exists(here):
            why = "the file no longer exists (a new one is started)"
        elif not isinstance(size, int) or os.path.getsize(here) < size:
            why = (f"the file has {os.path.getsize(here)} bytes, fewer than the {size} it "
                   "had at the checkpoint")
        elif fields is None or _header(here) != saved.get("header", fields):
            why = "its header is not the one the checkpoint's log had"
        else:
            return size
        warnings.warn(f"CSVLogger {self.path}: the resumed fit appends its rows without "
                      f"cutting the file back to the checkpoint: {why}", stacklevel=2)
        return None

    def on_epoch_end(self, epoch: int, logs: dict) -> None:
        row = flat_logs(logs)
        columns = list(row)
        if self.fields is not None and columns != self.fields and self._rows == 0:
            warnings.warn(f"CSVLogger {self.path}: this fit's columns {','.join(columns)} are "
                          f"not the header its rows would go under, {','.join(self.fields)}; "
                          "they start under a new header line", stacklevel=2)
            self.fields = None
        if self.fields is None:
            self.fields = columns
            self._first = self._first or columns
            self._writer.writerow(self.fields)
        elif columns != self.fields and not self._warned:
            self._warned = True
            missing = [name for name in self.fields if name not in row]
            extra = [name for name in columns if name not in self.fields]
            warnings.warn(f"CSVLogger {self.path}: epoch {epoch}'s logs do not match the "
                          f"header: columns without a value (left empty): {missing or 'none'}"
                          f"; values without a column (not written): {extra or 'none'}; "
                          "said once per fit", stacklevel=2)
        self._writer.writerow([_cell(row.get(name)) for name in self.fields])
        self._rows += 1
        self._file.flush()

    def on_train_end(self, logs: dict) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def state_dict(self) -> dict | None:
        """The file's absolute path, the header its rows go under (``fields``), its first
        line (``header``; another when a resumed fit started a new header line) and its size
        now."""
        if self._file is None:
            return None
        self._file.flush()
        return {"path": os.path.abspath(self.path), "fields": self.fields,
                "header": self._first, "size": os.fstat(self._file.fileno()).st_size}

    def load_state_dict(self, state: dict) -> None:
        self._saved = dict(state)


def _header(path: str) -> list[str] | None:
    """The header of an existing, non-empty CSV file, or None."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return None
    with open(path, newline="", encoding="utf-8") as file:
        return next(csv.reader(file), None)


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)  # the shortest text that reads back to the same float
    return str(value)


def summary_writer_class():
    """``torch.utils.tensorboard.SummaryWriter``, or an ImportError saying what to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise ImportError("fnmlp.callbacks.TensorBoard writes through the tensorboard "
                          "package, which is not installed: pip install tensorboard") from error
    return SummaryWriter


class TensorBoard(Callback):
    """Each epoch's logs as TensorBoard scalars (tag: the log key; an ensemble's members as
    ``train_loss/member_0``, ...; step: the epoch), flushed each epoch. A resumed fit purges
    the events of the epochs it runs again.

    Arguments:
        log_dir: the folder of the event files (``tensorboard --logdir`` it).

    Raises ImportError (``pip install tensorboard``) when made without the package.
    """

    lead_only = True

    def __init__(self, log_dir):
        self.log_dir = _check_path(log_dir, "TensorBoard's log_dir")
        if os.path.exists(self.log_dir) and not os.path.isdir(self.log_dir):
            raise NotADirectoryError(errno.ENOTDIR, f"TensorBoard's log_dir {self.log_dir} is "
                                     "a file, not a folder")
        self._writer_class = summary_writer_class()
        self.writer = None

    def on_train_begin(self, logs: dict) -> None:
        self.writer = self._writer_class(log_dir=self.log_dir,
                                         purge_step=logs["epoch"] if logs.get("resumed")
                                         else None)

    def on_epoch_end(self, epoch: int, logs: dict) -> None:
        for name, value in logs.items():
            if name == "epoch":
                continue
            if isinstance(value, (list, tuple)):
                for k, item in enumerate(value):
                    if _scalar(item):
                        self.writer.add_scalar(f"{name}/member_{k}", item, epoch)
            elif _scalar(value):
                self.writer.add_scalar(name, value, epoch)
        self.writer.flush()

    def on_train_end(self, logs: dict) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _scalar(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
