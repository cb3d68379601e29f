"""``fnmlp.schedules``: the learning-rate schedules of ``fnmlp.optim.schedules``, under the
short name, so that ``from fnmlp.schedules import cosine`` works as ``fnmlp.schedules.cosine``
does (see ``docs/guide/schedules.md``).

This module *is* ``fnmlp.optim.schedules``: importing it puts that module in its place, so
that ``fnmlp.schedules`` (the attribute ``fnmlp`` sets) stays that one module whichever
spelling is imported first, and both name the same objects.
"""

import sys

from fnmlp.optim import schedules as _schedules
from fnmlp.optim.schedules import (Constant, Cosine, Exponential, Lambda, LinearWarmup, Schedule,
                                   Sequential, StepDecay, as_lr, constant, cosine, exponential,
                                   lambda_lr, linear_warmup, sequence, step_decay)

__all__ = ["Schedule", "Constant", "StepDecay", "Exponential", "Cosine", "LinearWarmup",
           "Sequential", "Lambda", "constant", "step_decay", "exponential", "cosine",
           "linear_warmup", "sequence", "lambda_lr", "as_lr"]

sys.modules[__name__] = _schedules  # the import system then binds fnmlp.schedules to it
