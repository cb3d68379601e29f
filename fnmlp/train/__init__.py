"""The training layer of the design: the (compiled) training step and the ``fit`` loop."""

from fnmlp.train._errors import CompileVerificationError, NonFiniteLossError
from fnmlp.train._fit import FitResult, History, fit
from fnmlp.train._step import TrainStep, train_step

__all__ = ["train_step", "TrainStep", "fit", "FitResult", "History", "CompileVerificationError",
           "NonFiniteLossError"]
