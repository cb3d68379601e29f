"""``compile="auto"``: compile a step only when the time it saves can pay for compiling it.

The choice is an estimate made once, before the first step, from the fit's size and whether
this process compiled the same step already (never a timing, so the same call in the same
process trains the same way; eager and compiled steps agree within 1e-13 anyway). Measured on
2-core CPUs (torch 2.13, inductor's cache warm): a compiled step saves 150-400 µs per
``Linear`` layer over the eager step (optimizer updates and small kernels fused), and compiling
one graph takes 2-3 s with inductor's caches warm and 8-12 s in a fresh process; the estimate
takes the cautious ends.
"""

from __future__ import annotations

import numbers

from fnmlp.nn import Linear

SAVED_PER_LINEAR_S = 150e-6  # per step and Linear layer, the low end of the measurements
COMPILE_S = 10.0  # one graph, a fresh process (the high end)
CACHED_S = 0.5  # the same step compiled before in this process: a new batch size at most


def choose_compile(compile, model, steps: int, *, cached: bool = False,
                   loss=None) -> tuple[bool, str]:
    """``(compile?, why)`` for ``compile`` in (True, False, "auto") and a fit of ``model``
    taking ``steps`` steps; ``cached``: this process holds the compiled step already; a
    ``loss`` that takes no row weights is never compiled by "auto" (a compiled step pads a
    short batch with rows of weight 0)."""
    if compile is not True and compile is not False and compile != "auto":
        raise ValueError(f"compile must be True, False or 'auto', got {compile!r}")
    if compile == "auto" and not getattr(loss, "supports_weights", True):
        return False, "auto: the loss takes no row weights, which a compiled step needs"
    if compile is not True and compile is not False:
        linears = max(1, sum(isinstance(layer, Linear) for layer in model.layers))
        saved = steps * SAVED_PER_LINEAR_S * linears
        cost = CACHED_S if cached else COMPILE_S
        pays = saved > cost
        return pays, (f"auto: {steps} steps x ~{SAVED_PER_LINEAR_S * 1e6 * linears:.0f} µs "
                      f"saved per step ~ {saved:.1f} s {'>' if pays else '<'} "
                      f"~{cost:g} s to compile"
                      + (" (compiled before in this process)" if cached else ""))
    return compile, "compile=True" if compile else "compile=False"


def compiled_before(identity: tuple) -> bool:
    """Whether this process holds a compiled graph of the step ``identity`` (its graphs' key in
    the shared cache)."""
    from fnmlp.train._compile import has_graphs

    return has_graphs(identity)


CUDA_STEPS_PER_CALL = 8  # measured on an H200 (seed, float64): 107 µs a step at 1, 98 at 3,
# 94 at 30 per replay; compiling a chunk grows with its length (the steps are unrolled)


def choose_steps_per_call(steps_per_call, *, compiled: bool, device, batches: int) -> int:
    """How many steps the loop runs per call: ``steps_per_call`` (a count, or "auto") made at
    most an epoch's ``batches``. "auto": on CUDA, a compiled step runs up to
    ``CUDA_STEPS_PER_CALL`` steps per graph replay (the host's launch, copies and checks paid
    once per chunk); on the CPU one (a chunk of the seed step measured no faster there: its
    time is the kernels')."""
    if isinstance(steps_per_call, str) and steps_per_call == "auto":
        steps_per_call = CUDA_STEPS_PER_CALL if compiled and device.type == "cuda" else 1
    elif (isinstance(steps_per_call, bool) or not isinstance(steps_per_call, numbers.Integral)
          or steps_per_call < 1):
        raise ValueError(f"steps_per_call must be 'auto' or an integer >= 1, got "
                         f"{steps_per_call!r}")
    return max(1, min(int(steps_per_call), batches))
