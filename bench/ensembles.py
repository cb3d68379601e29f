"""``python bench/run.py --workload ensemble``: K seed-sized networks trained by one step.

For each ensemble size K and dtype, side by side in one run (contenders interleaved round by
round, medians): fnmlp's ensemble step (one compiled graph), the same run N steps per call
(``run_chunk``), K sequential compiled single-network steps, torch.func's documented ensembling
recipe (``stack_module_state`` + ``vmap`` + ``functional_call``, gradients by autograd), JAX's
``jit(vmap(step))`` and ``jit(lax.scan(vmap(step)))`` (if installed), and the ensemble's GEMM
floor: its own matrix products alone, same shapes, as the graph runs them. The chunked
contenders step over the epoch's N batches per call (the seed's 1000 rows: 4 batches of 333,
the last of 1 row padded with rows of weight 0); their step time is the call's over N.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

import fnmlp
from contenders import (JaxUnavailable, epoch_batches, jax_device, jax_scan, jax_sgd_step,
                        padded_batches, synchronize, to_jax)
from fnmlp.train.engine import Batch, Carry
from fnmlp import workloads as seed

SIZES = (1, 8, 32, 128)


@dataclasses.dataclass(frozen=True)
class Data:
    """A contender's data: ``x``, ``y`` the first batch (the per-step contenders'),
    ``epoch_x``, ``epoch_y`` the whole epoch (the chunked contenders'), ``batch`` its size."""

    x: Tensor
    y: Tensor
    epoch_x: Tensor
    epoch_y: Tensor
    batch: int


def _data(dtype, batch: int, device: str = "cpu", quick: bool = False) -> Data:
    """The seed data: its 1000 training rows (``quick``: 2·batch + 1)."""
    rows = 2 * batch + 1 if quick else seed.SEED_TRAIN
    x, y, _, _ = seed.seed_data(dtype=dtype, device=device)
    x, y = x[:rows].contiguous(), y[:rows].contiguous()
    return Data(x[:batch].contiguous(), y[:batch].contiguous(), x, y, batch)


class EnsembleContender:
    name = "fnmlp ensemble"

    def __init__(self, ensemble, params, data: Data, lr):
        x, y = data.x, data.y
        self.step = ensemble.train_step(fnmlp.mse, fnmlp.sgd(lr), compile=True)
        self.params = params
        self.opt_state = ensemble.init_optimizer(fnmlp.sgd(lr), params)
        self.state = ensemble.check_model_state(None, x)
        self.x, self.y = x, y
        start = time.perf_counter()
        self.run()
        synchronize(str(x.device))
        self.setup_seconds = time.perf_counter() - start

    def run(self):
        carry, _ = self.step.run(Carry(self.params, self.opt_state, self.state),
                                 Batch.of(self.x, self.y))
        self.params, self.opt_state = carry.params, carry.opt_state


class EnsembleChunkContender:
    """fnmlp's ensemble step over the epoch's N batches per call (``run_chunk``: one graph of
    N steps, one CUDA graph replay on CUDA)."""

    name = "fnmlp ensemble (chunked)"

    def __init__(self, ensemble, params, data: Data, lr):
        self.step = ensemble.train_step(fnmlp.mse, fnmlp.sgd(lr), compile=True)
        self.carry = Carry(params, ensemble.init_optimizer(fnmlp.sgd(lr), params),
                           ensemble.check_model_state(None, data.x))
        self.batches = epoch_batches(data.epoch_x, data.epoch_y, data.batch)
        self.steps_per_call = len(self.batches)
        start = time.perf_counter()
        self.run()
        synchronize(str(data.x.device))
        self.setup_seconds = time.perf_counter() - start

    def run(self):
        self.carry, _ = self.step.run_chunk(self.carry, self.batches)


class SequentialContender:
    name = "fnmlp sequential"

    def __init__(self, ensemble, params, data: Data, lr):
        x, y = data.x, data.y
        self.model = ensemble.model
        self.step = fnmlp.train_step(self.model, fnmlp.mse, fnmlp.sgd(lr), compile=True)
        self.members = [tree_map(torch.clone, ensemble.member(params, i))
                        for i in range(ensemble.size)]
        self.opt_states = [fnmlp.sgd(lr).init(p) for p in self.members]
        self.state = self.model.state_or_default(None, None)
        self.x, self.y = x, y
        start = time.perf_counter()
        self.step.run(Carry(self.members[0], self.opt_states[0], self.state), Batch.of(x, y))
        synchronize(str(x.device))
        self.setup_seconds = time.perf_counter() - start

    def run(self):
        for i in range(len(self.members)):
            carry, _ = self.step.run(Carry(self.members[i], self.opt_states[i], self.state),
                                     Batch.of(self.x, self.y))
            self.members[i], self.opt_states[i] = carry.params, carry.opt_state


class TorchFuncContender:
    """torch.func's model-ensembling recipe: stacked module state, ``vmap`` over
    ``functional_call``, gradients with ``torch.func.grad``, an SGD update over the stack."""

    name = "torch.func vmap"

    def __init__(self, ensemble, params, data: Data, lr):
        from torch.func import functional_call, grad, stack_module_state, vmap

        x, y = data.x, data.y
        twins = [fnmlp.to_torch(ensemble.model, ensemble.member(params, i))
                 for i in range(ensemble.size)]
        weights, buffers = stack_module_state(twins)
        self.weights = {k: v.detach() for k, v in weights.items()}
        base = copy.deepcopy(twins[0]).to("meta")

        def loss(w, b, xb, yb):
            return torch.nn.functional.mse_loss(functional_call(base, (w, b), (xb,)), yb)

        gradient = vmap(grad(loss), in_dims=(0, 0, None, None))

        def update(w, b, xb, yb):
            grads = gradient(w, b, xb, yb)
            return {k: w[k] - lr * grads[k] for k in w}

        self.update, self.buffers, self.x, self.y = update, buffers, x, y
        start = time.perf_counter()
        self.run()
        synchronize(str(x.device))
        self.setup_seconds = time.perf_counter() - start

    def run(self):
        self.weights = self.update(self.weights, self.buffers, self.x, self.y)


class JaxVmapContender:
    """JAX: ``jit(vmap(step))`` over stacked (W, b), the batch shared (in_axes None)."""

    name = "JAX jit(vmap)"

    def __init__(self, ensemble, params, data: Data, lr):
        import jax

        device = jax_device(str(data.x.device))
        train, self.params = jax_sgd_step(ensemble.model, params, lr, device=device)
        self.train = jax.jit(jax.vmap(train, in_axes=(0, None, None)))
        self.x, self.y = to_jax(data.x, device), to_jax(data.y, device)
        start = time.perf_counter()
        self.run()
        self.setup_seconds = time.perf_counter() - start

    def run(self):
        self.params, value = self.train(self.params, self.x, self.y)
        value.block_until_ready()


class JaxScanVmapContender:
    """JAX: ``jit(lax.scan(vmap(step)))``: the members' step mapped over stacked (W, b), the
    batch shared, scanned over the epoch's N batches stacked (the short last one padded with
    rows of weight 0)."""

    name = "JAX jit(lax.scan(vmap))"

    def __init__(self, ensemble, params, data: Data, lr):
        import jax

        device = jax_device(str(data.x.device))
        train, self.params = jax_sgd_step(ensemble.model, params, lr, device=device)
        self.train = jax.jit(jax_scan(jax.vmap(train, in_axes=(0, None, None, None))))
        self.data = [to_jax(a, device)
                     for a in padded_batches(data.epoch_x, data.epoch_y, data.batch)]
        self.steps_per_call = self.data[0].shape[0]
        start = time.perf_counter()
        self.run()
        self.setup_seconds = time.perf_counter() - start

    def run(self):
        self.params, values = self.train(self.params, *self.data)
        values.block_until_ready()


class GemmFloorContender:
    """The ensemble step's matrix products alone: every mm/bmm/addmm/baddbmm of its traced
    graph, same shapes and dtype, run back to back."""

    name = "GEMM floor"
    setup_seconds = 0.0

    def __init__(self, ensemble, params, data: Data, lr):
        from torch.fx.experimental.proxy_tensor import make_fx

        x, y = data.x, data.y
        # the eager ensemble step is the members' step mapped with vmap: traced, the same
        # products as the compiled graph
        step = ensemble.train_step(fnmlp.mse, fnmlp.sgd(lr), compile=False)
        opt_state = ensemble.init_optimizer(fnmlp.sgd(lr), params)
        state = ensemble.check_model_state(None, x)

        def function(p, o, s, xb, yb):
            return step.run(Carry(p, o, s), Batch.of(xb, yb))

        graph = make_fx(function)(params, opt_state, state, x, y)
        g = torch.Generator().manual_seed(0)
        self.products = []
        products = {torch.ops.aten.mm.default, torch.ops.aten.bmm.default,
                    torch.ops.aten.addmm.default, torch.ops.aten.baddbmm.default}
        for node in graph.graph.nodes:
            if node.op == "call_function" and node.target in products:
                args = [torch.randn(a.meta["val"].shape, dtype=x.dtype, generator=g).to(x.device)
                        if isinstance(a, torch.fx.Node) else a for a in node.args]
                self.products.append((node.target, args))

    def run(self):
        for op, args in self.products:
            op(*args)


def _contenders(ensemble, params, data: Data, lr, with_jax: bool):
    kinds = [EnsembleContender, EnsembleChunkContender, SequentialContender,
             TorchFuncContender, GemmFloorContender]
    if with_jax:
        kinds += [JaxVmapContender, JaxScanVmapContender]
    return [kind(ensemble, params, data, lr) for kind in kinds]


def _jax_skipped(device: str) -> str | None:
    """Why JAX's contenders cannot run on ``device`` (None: they can)."""
    try:
        jax_device(device)
    except JaxUnavailable as error:
        return str(error)
    return None


def _time(contenders, rounds: int, repeats: int, device: str) -> dict[str, list[float]]:
    """Seconds per step of each contender, one per round, the contenders round-robin: a
    call's time over its ``steps_per_call``."""
    for contender in contenders:  # warm: first calls allocate and load kernels
        for _ in range(2):
            contender.run()
    times = {c.name: [] for c in contenders}
    for _ in range(rounds):
        for contender in contenders:
            synchronize(device)
            start = time.perf_counter()
            for _ in range(repeats):
                contender.run()
            synchronize(device)
            calls = repeats * getattr(contender, "steps_per_call", 1)
            times[contender.name].append((time.perf_counter() - start) / calls)
    return times


def run(quick: bool = False, sizes=None, dtypes=("float32", "float64"), rounds: int = 7,
        batch: int = seed.SEED_BATCH_SIZE, lr: float = seed.SEED_LR,
        device: str = "cpu") -> dict:
    """The figures, one entry per (K, dtype): per-step times (the chunked contenders' a
    call's over its steps)."""
    sizes = sizes or ((1, 4) if quick else SIZES)
    rounds = 2 if quick else rounds
    skipped = _jax_skipped(device)
    results = []
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        data = _data(dtype, batch, device, quick)
        for size in sizes:
            ensemble = fnmlp.Ensemble(seed.seed_model(), size=size)
            params = ensemble.init(torch.Generator().manual_seed(0), dtype=dtype,
                                   device=device)
            contenders = _contenders(ensemble, params, data, lr, skipped is None)
            repeats = max(1, 64 // size) if not quick else 1
            times = _time(contenders, rounds, repeats, device)
            medians = {name: statistics.median(t) for name, t in times.items()}
            ours = medians["fnmlp ensemble"]
            results.append({
                "size": size, "dtype": dtype_name, "batch": batch, "device": device,
                "steps_per_call": {c.name: getattr(c, "steps_per_call", 1)
                                   for c in contenders},
                "step_ms": {name: 1e3 * t for name, t in medians.items()},
                "per_member_us": {name: 1e6 * t / size for name, t in medians.items()},
                "speedup": {name: t / ours for name, t in medians.items()},
                "setup_s": {c.name: c.setup_seconds for c in contenders},
            })
    return {"workload": "ensemble", "results": results,
            "skipped": [] if skipped is None else [skipped]}


def format_result(result: dict) -> str:
    names = list(result["results"][0]["step_ms"])
    lines = ["\n== ensemble: K seed networks (6-32-32-32-32-3, batch 333, SGD), one step of all "
             "K; per-member µs per step (ratio = that contender's time / fnmlp ensemble's)",
             f"{'K':>4} {'dtype':>8} " + " ".join(f"{n:>24}" for n in names)]
    for r in result["results"]:
        cells = [f"{r['per_member_us'][n]:>10.1f} µs ({r['speedup'][n]:>5.2f}×)" for n in names]
        lines.append(f"{r['size']:>4} {r['dtype']:>8} " + " ".join(f"{c:>24}" for c in cells))
    lines.append("compile (first call), s: " + "; ".join(
        f"K={r['size']} {r['dtype']}: {r['setup_s']['fnmlp ensemble']:.1f} "
        f"(chunked {r['setup_s']['fnmlp ensemble (chunked)']:.1f})"
        for r in result["results"]))
    chunked = {n: k for n, k in result["results"][0].get("steps_per_call", {}).items() if k > 1}
    if chunked:
        lines.append("chunked (" + ", ".join(f"{n}: {k}" for n, k in chunked.items())
                     + " steps per call, the short last batch padded with rows of weight 0): "
                     "per step = the call's time / steps")
    lines += [f"{name} skipped" for name in result.get("skipped", [])]
    return "\n".join(lines)


def plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = sorted({r["dtype"] for r in result["results"]})
    figure, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes):
        rows = [r for r in result["results"] if r["dtype"] == dtype]
        for name in rows[0]["per_member_us"]:
            ax.plot([r["size"] for r in rows], [r["per_member_us"][name] for r in rows],
                    marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("members K")
        ax.set_ylabel("µs per member per step")
        ax.set_title(f"seed ensemble step, {dtype}")
        ax.legend()
    figure.tight_layout()
    figure.savefig(path)
