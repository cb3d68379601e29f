"""The optimization layer of the design: optimizers as ``init``/``update`` pairs over pytrees
(each following its ``torch.optim`` counterpart's arithmetic) and learning-rate schedules as
pure functions of the step count."""

from fnmlp.optim import schedules
from fnmlp.optim._optimizers import (SGD, Adagrad, AdagradState, Adam, AdamState,
                                     ClipByGlobalNorm, Optimizer, RMSprop, RMSpropState, SGDState,
                                     adagrad, adam, adamw, clip_by_global_norm, rmsprop, sgd)

__all__ = [
    "sgd", "adam", "adamw", "rmsprop", "adagrad", "clip_by_global_norm", "schedules",
    "Optimizer", "SGD", "SGDState", "Adam", "AdamState", "RMSprop", "RMSpropState", "Adagrad",
    "AdagradState", "ClipByGlobalNorm",
]
