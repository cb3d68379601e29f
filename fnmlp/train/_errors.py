"""The training layer's errors."""

from fnmlp._errors import FnmlpError


class CompileVerificationError(FnmlpError, RuntimeError):
    """The compiled step disagreed with the eager step (a compiler bug); use compile=False."""


class NonFiniteLossError(FnmlpError, RuntimeError):
    """The loss became NaN or inf. Carries the last finite parameters, optimizer state and model
    state, and the history so far."""

    def __init__(self, message, *, epoch, batch, params, opt_state, history, state=None):
        super().__init__(message)
        self.epoch, self.batch = epoch, batch
        self.params, self.opt_state, self.history, self.state = params, opt_state, history, state
