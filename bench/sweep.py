"""``python bench/run.py --workload sweep``: a hidden-width sweep, end to end.

The seed network at hidden widths 16, 32, 64 and 128, each trained for the seed workload's 32
epochs (batch 333, SGD 0.01, float64) one after the other in one process, as a user sweeping a
hyperparameter does: total wall time per contender, compiles included (each width is a new
graph), and each width's share. Contenders: fnmlp with ``fit``'s default ``compile="auto"``,
fnmlp eager, fnmlp compiled (``fit(compile=True)``) and JAX (``jit`` of value_and_grad + SGD,
a new trace per width) when installed.
"""

from __future__ import annotations

import time

import torch

import fnmlp
from fnmlp import workloads as seed

WIDTHS = (16, 32, 64, 128)


def model_of(width: int) -> fnmlp.MLP:
    """The seed network with every hidden layer ``width`` wide."""
    *hidden, (last_activation, outputs) = seed.SEED_LAYERS
    return fnmlp.MLP(seed.SEED_FEATURES, [*(fnmlp.Dense(width, activation)
                                            for activation, _ in hidden),
                                          fnmlp.Dense(outputs, last_activation)])


def _fnmlp(compile: bool):
    def fit(model, params, x, y, epochs):
        fnmlp.fit(model, params, x, y, epochs=epochs, batch_size=seed.SEED_BATCH_SIZE,
                  optimizer=fnmlp.sgd(seed.SEED_LR), compile=compile)
    return fit


def _jax(model, params, x, y, epochs):
    import jax
    import jax.numpy as jnp

    from contenders import jax_sgd_step

    train, ps = jax_sgd_step(model, params, seed.SEED_LR)
    train = jax.jit(train)
    xs, ys = jnp.asarray(x.numpy()), jnp.asarray(y.numpy())
    batch = seed.SEED_BATCH_SIZE
    for _ in range(epochs):
        for start in range(0, len(xs), batch):
            ps, value = train(ps, xs[start:start + batch], ys[start:start + batch])
        value.block_until_ready()


def run(quick: bool = False) -> dict:
    """Total and per-width wall time of each contender."""
    widths = WIDTHS[:2] if quick else WIDTHS
    epochs = 2 if quick else seed.SEED_EPOCHS
    x, y, _, _ = seed.seed_data()
    contenders = {"fnmlp auto": _fnmlp("auto"), "fnmlp eager": _fnmlp(False),
                  "fnmlp compiled": _fnmlp(True)}
    try:
        import jax  # noqa: F401
        contenders["JAX jit"] = _jax
    except ImportError:
        pass
    results = {}
    for name, fit in contenders.items():
        per_width = {}
        for width in widths:
            model = model_of(width)
            params = model.init(torch.Generator().manual_seed(0), dtype=seed.SEED_DTYPE)
            start = time.perf_counter()
            fit(model, params, x, y, epochs)
            per_width[width] = time.perf_counter() - start
        results[name] = {"total_s": sum(per_width.values()), "per_width_s": per_width}
    return {"workload": "sweep", "widths": list(widths), "epochs": epochs, "results": results}


def format_result(result: dict) -> str:
    widths = result["widths"]
    lines = [f"\n== sweep: the seed network at hidden widths {widths}, {result['epochs']} "
             "epochs each, one process, compiles included (seconds)",
             f"{'contender':<16} {'total':>8} " + " ".join(f"{'w=' + str(w):>8}"
                                                          for w in widths)]
    for name, figures in result["results"].items():
        lines.append(f"{name:<16} {figures['total_s']:>8.2f} " + " ".join(
            f"{figures['per_width_s'][w]:>8.2f}" for w in widths))
    return "\n".join(lines)
