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

from fnmlp.nn import Linear

SAVED_PER_LINEAR_S = 150e-6  # per step and Linear layer, the low end of the measurements
COMPILE_S = 10.0  # one graph, a fresh process (the high end)
CACHED_S = 0.5  # the same step compiled before in this process: a new batch size at most


def choose_compile(compile, model, steps: int, *, cached: bool = False) -> tuple[bool, str]:
    """``(compile?, why)`` for ``compile`` in (True, False, "auto") and a fit of ``model``
    taking ``steps`` steps; ``cached``: this process holds the compiled step already."""
    if compile is not True and compile is not False and compile != "auto":
        raise ValueError(f"compile must be True, False or 'auto', got {compile!r}")
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
