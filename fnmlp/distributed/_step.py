"""The data-parallel step: each rank's shard of the global batch, one all-reduce, one update.

Every rank receives the same global batch (``fit`` runs the same loop everywhere) and takes its
contiguous shard of ceil(m/N) rows, zero-weighted padding filling the last shards, so every rank
runs the same shapes. Per rank: the gradient of its shard's loss, scaled by the shard's weight
W_r (rows, or row-weight sum) for a "mean" loss; one flat bucket [W_r·g, W_r·loss, W_r] is
summed over the ranks; the global gradient is then Σ W_r·g_r / Σ W_r — the gradient of the
global batch's loss — and every rank applies the same update. An L2 penalty is added after the
reduction, on the global batch's weight.

Compiled, the step is one graph with a functional all-reduce inside (``collective="in_graph"``,
the default on the CPU: measured 11–18% faster per step with 2 gloo ranks,
``bench/data_parallel.py``) or two graphs with the all-reduce between them (``"between"``, the
default on CUDA): the gradient graph (forward, backward, the bucket), then the update graph
(unpacking, L2, the optimizer). With NCCL a failed peer is detected by NCCL's own watchdog,
which aborts the process rather than raising ``DistributedError``.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from fnmlp._tree import flatten, tree_builder
from fnmlp.distributed import _group
from fnmlp.distributed._group import (all_reduce_sum, collective_call, rank, wait_for_all,
                                      world_size)
from fnmlp.nn import (EVAL, MLP, CrossEntropy, Loss, check_l2, forward, l2_penalty,
                      value_and_grad)
from fnmlp.optim import ClipByGlobalNorm, Optimizer
from fnmlp.train.engine import (EAGER, TRACED, Batch, Carry, Kernels, StepKind, StepThreads,
                                Strategy, check_step_options, compile_graph, flushed_denormals,
                                pad_rows, shared_graphs, verify)

COMPILE_TIMEOUT = 1800.0  # seconds the ranks wait for each other to compile (a cold cache)


def check_distributable(model: MLP, loss: Loss) -> None:
    """Refuse what a data-parallel step cannot reproduce exactly, naming it."""
    if model.has_batch_statistics:
        raise ValueError("distributed fit does not support BatchNorm: its batch statistics "
                         "would be each rank's, not the global batch's (use LayerNorm)")
    if model.has_dropout:
        raise ValueError("distributed fit does not support Dropout yet (each rank's masks "
                         "would have to follow its rows' global positions)")
    if isinstance(loss, CrossEntropy) and (loss.weight is not None
                                           or loss.ignore_index is not None):
        raise ValueError("distributed fit supports CrossEntropy without class weights or "
                         "ignore_index (their mean divides by a label-dependent sum)")
    if loss.reduction not in ("mean", "sum"):
        raise ValueError(f"distributed fit needs a loss reduced by 'mean' or 'sum', got "
                         f"{loss.reduction!r}")


class DistributedStep(StepKind):
    """The data-parallel step kind: ``run(carry, batch)`` as ``TrainStep.run``, for the global
    batch: this rank computes its shard, the ranks sum their gradients, every rank updates
    alike. ``collective``: where a compiled step's all-reduce runs, "in_graph" (one graph; the
    default on the CPU) or "between" (two graphs; the default on CUDA, where
    ``torch.compile`` compiles at the first call: both graphs are run once before the ranks
    wait for each other, so a slow compile never counts against the timeout). Its graphs live
    in the shared cache; ``threads``, ``verify`` and the denormal flush work as for one
    network."""

    model: MLP
    optimizer: Optimizer | ClipByGlobalNorm

    def __init__(self, model: MLP, loss: Loss, optimizer, *, compile: bool = False,
                 l2: float = 0.0, collective: str | None = None, threads="auto",
                 verify: bool = False, flush_denormals: bool = True):
        check_step_options(loss, optimizer, "auto")
        check_distributable(model, loss)
        self.model, self.loss, self.optimizer = model, loss, optimizer
        self.l2, self.compile = check_l2(l2), bool(compile)
        self.rank, self.ranks = rank(), world_size()
        self.lead = self.rank == 0
        self.mean = loss.reduction == "mean"
        if collective not in (None, "between", "in_graph"):
            raise ValueError(f"collective must be 'between' or 'in_graph', got {collective!r}")
        self.collective = collective
        self.flush_denormals = bool(flush_denormals)
        self._threads = StepThreads(threads, model)
        self._verify_next = bool(verify) and self.compile
        self._graphs = shared_graphs(("data-parallel", model, loss, optimizer.structure,
                                      self.l2, self.ranks, self.rank)).by_specialization
        self._eager: dict[tuple, tuple] = {}  # the eager functions, this step's own
        self._ready: set = set()  # specializations every rank has (see _all_ready)

    def forget(self) -> None:
        """Nothing is kept between steps (the interface of ``TrainStep``)."""

    def pin_threads(self, extras: dict, rows: int, device: torch.device) -> None:
        self._threads.pin(extras, self.shard(rows)[1], device)

    def shard(self, rows: int, pad_to: int | None = None) -> tuple[slice, int]:
        """This rank's rows of a global batch of ``rows`` (a slice) and the shard size every
        rank pads to."""
        size = math.ceil(max(rows, pad_to or 0) / self.ranks)
        start = min(self.rank * size, rows)
        return slice(start, min(start + size, rows)), size

    def run(self, carry: Carry, batch: Batch, active=None) -> tuple[Carry, Tensor]:
        """``(carry, loss)`` after one step on the global batch."""
        x, y, weight = batch.x, batch.y, batch.weight
        mine, size = self.shard(x.shape[0], batch.pad_to)
        xs, ys = x[mine], y[mine]
        ws = (torch.ones(xs.shape[0], dtype=x.dtype, device=x.device) if weight is None
              else weight[mine])
        xs, ys, ws = pad_rows(xs, size), pad_rows(ys, size), pad_rows(ws, size)
        params, opt_state = carry.params, carry.opt_state
        param_leaves, param_spec = flatten(params)
        opt_leaves, opt_spec = flatten(opt_state)
        collective = self.collective or ("in_graph" if xs.device.type == "cpu" else "between")
        with self._threads(size, xs.device) as threads, torch.no_grad():
            flush = (self.compile and self.flush_denormals and xs.device.type == "cpu"
                     and threads == 1)  # the step's count, not the one around it
            with flushed_denormals(flush):
                if self.compile and collective == "in_graph":
                    step = self._fused_graph(param_spec, opt_spec, param_leaves, opt_leaves,
                                             [xs, ys, ws], threads)
                    outputs = collective_call(
                        lambda: step(*param_leaves, *opt_leaves, xs, ys, ws),
                        "the step's in-graph all-reduce")
                else:
                    gradient, update = self._functions(param_spec, opt_spec, xs, ys, ws,
                                                       param_leaves, opt_leaves, threads)
                    bucket = gradient(*param_leaves, xs, ys, ws)
                    bucket = all_reduce_sum(bucket, "the gradient all-reduce")
                    outputs = update(*param_leaves, *opt_leaves, bucket)
            if self._verify_next:
                self._verify(param_spec, opt_spec, param_leaves, opt_leaves, [xs, ys, ws],
                             list(outputs))
        new_params = tree_builder(param_spec)(outputs[:len(param_leaves)])
        new_opt_state = tree_builder(opt_spec)(outputs[len(param_leaves):-1])
        return Carry(new_params, new_opt_state, carry.state), outputs[-1]

    def _verify(self, param_spec, opt_spec, param_leaves, opt_leaves, data, outputs) -> None:
        """The first compiled step against the eager functions (every rank: one more
        all-reduce)."""
        gradient = self._gradient_function(param_spec, EAGER)
        update = self._update_function(param_spec, opt_spec, [p.shape for p in param_leaves],
                                       EAGER)
        bucket = all_reduce_sum(gradient(*param_leaves, *data), "the verification all-reduce")
        verify(outputs, list(update(*param_leaves, *opt_leaves, bucket)))
        self._verify_next = False

    def dropout_key(self, seed: int, step: int, device: torch.device) -> Tensor:
        raise ValueError("distributed fit does not support Dropout")

    def valid_losses(self, carry: Carry, x: Tensor, y: Tensor) -> list[float]:
        return [self.evaluate(carry.params, x, y)]

    def agree(self, flag: bool) -> bool:
        return _group.any_rank(flag)

    def agree_rate(self, carry: Carry) -> Carry:
        """Rank 0's base learning rate on every rank (a callback may have set it from this
        rank's times or metrics): one broadcast of the rate tensor, after the callbacks."""
        state = carry.opt_state
        (rate,) = _group.broadcast([state.learning_rate], "broadcasting rank 0's learning rate")
        return Carry(carry.params, dataclasses.replace(state, learning_rate=rate), carry.state)

    def evaluate(self, params, x: Tensor, y: Tensor) -> float:
        """The loss of the evaluation-mode predictions on (x, y), every rank computing its
        shard of the rows and the ranks summing [W_r·loss_r, W_r] (as the steps do)."""
        mine, _ = self.shard(x.shape[0])
        xs, ys = x[mine], y[mine]
        with torch.no_grad():
            if xs.shape[0] == 0:
                pair = torch.zeros(2, dtype=x.dtype, device=x.device)
            else:
                weight = torch.ones(xs.shape[0], dtype=x.dtype, device=x.device)
                state = self.model.state_or_default(None, None)
                prediction = forward(self.model, params, xs, state, EVAL)[0]
                value, _ = self.loss.forward(prediction, ys, weight)
                total = weight.sum() if self.mean else torch.ones((), dtype=x.dtype,
                                                                  device=x.device)
                pair = torch.stack([value * total, total])
            pair = all_reduce_sum(pair, "the validation loss all-reduce")
        return (pair[0] / pair[1]).item() if self.mean else pair[0].item()

    def parts(self, params, opt_state, xs: Tensor, ys: Tensor, ws: Tensor):
        """The step's two halves over flat leaves, to time them apart: ``gradient(*param_leaves,
        xs, ys, ws) -> bucket`` (this rank's shard) and ``update(*param_leaves, *opt_leaves,
        summed_bucket) -> (*param_leaves, *opt_leaves, loss)``; compiled with ``compile``."""
        param_leaves, param_spec = flatten(params)
        opt_leaves, opt_spec = flatten(opt_state)
        return self._functions(param_spec, opt_spec, xs, ys, ws, param_leaves, opt_leaves)

    def _functions(self, param_spec, opt_spec, xs, ys, ws, param_leaves, opt_leaves,
                   threads: int | None = None):
        """The gradient and update functions, made once per shapes and thread count (None:
        this thread's; compiled with ``compile``)."""
        threads = torch.get_num_threads() if threads is None else threads
        specialization = (param_spec, opt_spec, threads, *[
            (t.shape, t.dtype) for t in (*param_leaves, *opt_leaves, xs, ys, ws)])
        cache = self._graphs if self.compile else self._eager
        graphs = cache.get(specialization)
        if graphs is not None:
            self._all_ready(specialization)
            return graphs
        kernels = TRACED if self.compile else EAGER
        gradient = self._gradient_function(param_spec, kernels)
        update = self._update_function(param_spec, opt_spec, [p.shape for p in param_leaves],
                                       kernels)
        if not self.compile:
            graphs = self._eager[specialization] = (gradient, update)
        else:
            with torch.no_grad():
                bucket = gradient(*param_leaves, xs, ys, ws)
                graphs = self._graphs[specialization] = (
                    compile_graph(gradient, [*param_leaves, xs, ys, ws], compiler="auto",
                                  cuda_graphs=False, threads=threads),
                    compile_graph(update, [*param_leaves, *opt_leaves, bucket],
                                  compiler="auto", cuda_graphs=False, threads=threads))
                graphs[0](*param_leaves, xs, ys, ws)  # compiles now where compiling is lazy
                graphs[1](*param_leaves, *opt_leaves, bucket)
            self._all_ready(specialization)
        return graphs

    def _all_ready(self, specialization) -> None:
        """Wait for every rank the first time this step runs compiled graphs of
        ``specialization``: whether a rank found them in the shared cache or compiled them
        (which may take one rank minutes longer), every rank waits here alike."""
        if self.compile and specialization not in self._ready:
            self._ready.add(specialization)
            wait_for_all("waiting for every rank to compile its step", COMPILE_TIMEOUT)

    def _fused_graph(self, param_spec, opt_spec, param_leaves: list[Tensor],
                     opt_leaves: list[Tensor], data: list[Tensor], threads: int):
        """One compiled graph: the gradient, a functional all-reduce, the update (its CPU
        kernels built for ``threads`` threads)."""
        args = [*param_leaves, *opt_leaves, *data]
        specialization = ("in_graph", param_spec, opt_spec, threads,
                          *[(t.shape, t.dtype) for t in args])
        graph = self._graphs.get(specialization)
        if graph is not None:
            self._all_ready(specialization)
        else:
            import torch.distributed as dist
            import torch.distributed._functional_collectives as collectives

            gradient = self._gradient_function(param_spec, TRACED)
            update = self._update_function(param_spec, opt_spec, [p.shape for p in param_leaves],
                                           TRACED)
            count = len(param_leaves)

            def fnmlp_distributed_step(*args):
                params, opt_leaves, (x, y, w) = args[:count], args[count:-3], args[-3:]
                bucket = gradient(*params, x, y, w)
                bucket = collectives.wait_tensor(
                    collectives.all_reduce(bucket, "sum", dist.group.WORLD))
                return update(*params, *opt_leaves, bucket)

            with torch.no_grad():
                graph = self._graphs[specialization] = compile_graph(
                    fnmlp_distributed_step, args, compiler="auto", cuda_graphs=False,
                    threads=threads)
            self._all_ready(specialization)
        return graph

    def _gradient_function(self, param_spec, kernels: Kernels):
        """``(*param_leaves, x, y, w) -> bucket``: [W_r·g..., W_r·loss, W_r] for a mean loss,
        [g..., loss, 1] for a summed one; zeros for a shard without weight."""
        build, model, loss, mean = tree_builder(param_spec), self.model, self.loss, self.mean
        state = model.state_or_default(None, None)

        def fnmlp_shard_gradient(*args):
            *leaves, x, y, w = args
            value, grads, _ = value_and_grad(model, build(list(leaves)), x, y, loss, state,
                                             weight=w, lane_order_sums=kernels.lane_order_sums)
            total = w.sum()
            scale = total if mean else torch.ones_like(total)
            pieces = [(g * scale).reshape(-1) for g in flatten(grads)[0]]
            bucket = torch.cat([*pieces, (value * scale).reshape(1), scale.reshape(1)])
            return torch.where(total > 0, bucket, torch.zeros_like(bucket))

        return fnmlp_shard_gradient

    def _update_function(self, param_spec, opt_spec, shapes, kernels: Kernels):
        """``(*param_leaves, *opt_leaves, summed bucket) -> (*param_leaves, *opt_leaves,
        loss)``: the global gradient and loss, the L2 penalty, the optimizer's update."""
        build_params, build_opt = tree_builder(param_spec), tree_builder(opt_spec)
        sizes = [math.prod(shape) for shape in shapes]
        count, model, loss, optimizer, l2 = len(shapes), self.model, self.loss, self.optimizer, \
            self.l2
        mean = self.mean

        def fnmlp_update(*args):
            params = build_params(list(args[:count]))
            opt_state = build_opt(list(args[count:-1]))
            bucket = args[-1]
            total = bucket[-1]
            if mean:
                bucket = bucket / total
            pieces = bucket[:-2].split(sizes)
            grads = build_params([piece.view(shape) for piece, shape in zip(pieces, shapes)])
            value = bucket[-2]
            if l2:
                value, grads = l2_penalty(model, params, grads, value, l2, loss, total, None)
            params, opt_state = optimizer.unchecked_update(params, grads, opt_state,
                                                           fused=kernels.fused_optimizer)
            return (*flatten(params)[0], *flatten(opt_state)[0], value)

        return fnmlp_update


class DataParallel(Strategy):
    """``fnmlp.fit(..., distributed=True)``: every rank ``torchrun`` started runs the same fit on
    the same data; each global batch's rows are split across the ranks, their gradients summed
    by one all-reduce, and the result is the one-process fit of the same global batches (to
    rounding). Rank 0's parameters (and shuffling stream) are broadcast first; only rank 0
    prints and checkpoints."""

    lead = True

    def setup(self, like: Tensor, *, verify: bool, compiler: str) -> None:
        if compiler != "auto":
            raise ValueError("compiler= is not supported with distributed=True")
        _group.init(device=like.device)
        self.lead = rank() == 0

    def agree_compile(self, compile: bool, reason: str) -> tuple[bool, str]:
        if _group.any_rank(compile) != compile:  # every rank alike
            return True, "another rank compiles"
        return compile, reason

    def make_step(self, model, loss, optimizer, *, compile, verify, compiler, l2, threads):
        return DistributedStep(model, loss, optimizer, compile=compile, l2=l2, threads=threads,
                               verify=verify)

    def check_same_run(self, x, y, weight, valid, **settings) -> None:
        _group.check_same_run(x, y, weight, valid, **settings)

    def start(self, run, generator):
        _group.check_same({"epoch": run.epoch, "steps done": run.steps_done},
                          "the run each rank starts or resumes (its checkpoint file)")
        params, opt_state, generator = _group.start_alike(run.carry.params,
                                                          run.carry.opt_state, generator)
        run.carry = Carry(params, opt_state, run.carry.state)
        return generator

    def finish(self) -> None:
        """Return once rank 0's last checkpoint is written."""
        wait_for_all("waiting for rank 0 to finish", _group.DEFAULT_TIMEOUT)
