"""The training engine's building blocks, for the kinds of training built on it (ensembles,
data-parallel ranks, the scikit-learn estimators) and for a user's own.

- ``Executor``: runs a kind's pure step function ``f(carry, *data) -> (carry, loss)`` eagerly
  or compiled through the one graph cache, with ``verify``, ``threads`` and the denormal flush;
  ``Kernels`` (``EAGER``, ``BATCHED``, ``TRACED``) is how the function computes;
- ``StepKind``: what the loop needs of a step (``TrainStep`` is one network's);
- ``BatchSource``, ``Batch``, ``Run``, ``Carry``, ``train_loop``: the one loop;
- policies: ``EarlyStopping``, ``Reporter``, ``Checkpointer``, ``CallbackRunner`` (a fit's
  ``fnmlp.callbacks``), ``EpochMetrics`` (its ``metrics=``), ``HistoryKeeper`` (the epochs'
  rates and metrics for the history; ``kept_history`` reads them), ``EpochFunction`` (an
  ``on_epoch_end`` function with the estimators' logs); ``Policy`` is their base;
  ``restore_run`` to resume;
- ``Strategy``: where one network's steps run (this process, or data-parallel ranks);
- checks shared by every fit: ``check_run_options``, ``check_valid``, ``checkpoint_settings``,
  ``check_step_options``, ``check_threads``; ``settle_thread`` at an entry point (a new
  thread's torch thread count started safely beside other threads' steps);
  ``choose_compile`` for ``compile="auto"``,
  ``choose_steps_per_call`` for ``steps_per_call``;
- for a kind that runs its graphs itself (data-parallel's all-reduce between two graphs):
  ``compile_graph``, ``shared_graphs``, ``pad_rows``, ``verify``, ``StepThreads``,
  ``flushed_denormals``; the thread rule itself (``choose_threads``, ``step_work``,
  ``SERIAL_WORK``).
"""

from fnmlp.train._auto import choose_compile, choose_steps_per_call, compiled_before
from fnmlp.train._compile import compile_graph, pad_rows, shared_graphs, verify
from fnmlp.train._denormals import flushed_denormals
from fnmlp.train._executor import BATCHED, EAGER, TRACED, Carry, Executor, Kernels
from fnmlp.train._fit import Strategy, check_run_options, check_valid, checkpoint_settings
from fnmlp.train._loop import (Batch, BatchSource, EarlyStopping, Policy, Run, StepKind,
                               all_finite, train_loop)
from fnmlp.train._callbacks import CallbackRunner, check_callbacks
from fnmlp.train._epoch_metrics import EpochMetrics, check_metrics, check_metrics_run
from fnmlp.train._policies import (Checkpointer, EpochFunction, HistoryKeeper, Reporter,
                                   epoch_log_keys, kept_history, summary)
from fnmlp.train._run import restore_run
from fnmlp.train._step import TrainStep, check_step_options, network_identity
from fnmlp.train._thread_scopes import settle_thread
from fnmlp.train._threads import (SERIAL_WORK, StepThreads, check_threads, choose_threads,
                                  describe_threads, step_work)

__all__ = [
    "Executor", "Kernels", "EAGER", "BATCHED", "TRACED", "Carry", "StepKind", "TrainStep",
    "Batch", "BatchSource", "Run", "train_loop", "all_finite", "Policy", "EarlyStopping",
    "Reporter", "EpochFunction", "Checkpointer", "CallbackRunner", "check_callbacks",
    "EpochMetrics", "check_metrics", "check_metrics_run", "epoch_log_keys", "HistoryKeeper",
    "kept_history", "restore_run",
    "summary", "Strategy",
    "check_run_options", "check_valid", "checkpoint_settings", "check_step_options",
    "check_threads", "describe_threads", "choose_compile", "choose_steps_per_call",
    "compiled_before", "network_identity",
    "compile_graph", "shared_graphs", "pad_rows", "verify", "StepThreads", "flushed_denormals",
    "choose_threads", "step_work", "SERIAL_WORK", "settle_thread",
]
