"""Callbacks for ``fnmlp.fit`` and ``Ensemble.fit`` (``fit(..., callbacks=[...])``).

- ``Callback``: the base class: ``check`` (before any work: raise for a configuration the fit
  cannot satisfy), ``on_train_begin``, ``on_batch_end``, ``on_epoch_end``, ``on_train_end``,
  ``state_dict``/``load_state_dict`` (kept in checkpoints), ``self.trainer``
  (``Trainer``: the fit in progress, its settable ``learning_rate`` and ``stop_training``);
- ``CSVLogger`` and ``TensorBoard``: each epoch's logs to a CSV file or TensorBoard;
- ``ReduceLROnPlateau``: torch's scheduler of that name, driven by the validation loss.

See ``docs/guide/callbacks.md``.
"""

from fnmlp.train._callbacks import Callback, Trainer
from fnmlp.train._plateau import ReduceLROnPlateau
from fnmlp.train._writers import CSVLogger, TensorBoard

__all__ = ["Callback", "Trainer", "CSVLogger", "TensorBoard", "ReduceLROnPlateau"]
