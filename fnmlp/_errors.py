"""``FnmlpError``: the one base of fnmlp's own exceptions.

Each also subclasses the built-in exception it always was (``ValueError`` or
``RuntimeError``), so ``except RuntimeError`` keeps catching what it caught, and ``except
fnmlp.FnmlpError`` catches every failure that fnmlp itself reports.
"""


class FnmlpError(Exception):
    """Base of ``CheckpointError``, ``NonFiniteLossError``, ``DistributedError``,
    ``CompileVerificationError`` and ``SpecError``."""
