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

import math

import torch
from torch import Tensor

from fnmlp._tree import flatten, tree_builder
from fnmlp.distributed._group import (all_reduce_sum, collective_call, rank, wait_for_all,
                                      world_size)
from fnmlp.nn._losses import CrossEntropy, Loss
from fnmlp.nn._model import (EVAL, MLP, check_loss, check_l2, forward, l2_penalty,
                             value_and_grad)
from fnmlp.optim._optimizers import ClipByGlobalNorm, Optimizer

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


class DistributedStep:
    """``run(params, opt_state, state, x, y, weight=..., pad_to=...)`` as ``TrainStep.run``,
    for the global batch (x, y): this rank computes its shard, the ranks sum their gradients,
    every rank updates alike. ``collective``: where a compiled step's all-reduce runs,
    "in_graph" (one graph; the default on the CPU) or "between" (two graphs; the default on
    CUDA, where ``torch.compile`` compiles at the first call: both graphs are run once before
    the ranks wait for each other, so a slow compile never counts against the timeout)."""

    def __init__(self, model: MLP, loss: Loss, optimizer, *, compile: bool = False,
                 l2: float = 0.0, collective: str | None = None):
        check_loss(loss)
        check_distributable(model, loss)
        if not isinstance(optimizer, (Optimizer, ClipByGlobalNorm)):
            raise TypeError(f"optimizer must be an fnmlp optimizer such as fnmlp.sgd(0.01), "
                            f"got {optimizer!r}")
        self.model, self.loss, self.optimizer = model, loss, optimizer
        self.l2, self.compile = check_l2(l2), compile
        self.rank, self.ranks = rank(), world_size()
        self.mean = loss.reduction == "mean"
        if collective not in (None, "between", "in_graph"):
            raise ValueError(f"collective must be 'between' or 'in_graph', got {collective!r}")
        self.collective = collective
        self._graphs: dict[tuple, object] = {}

    def forget(self) -> None:
        """Nothing is kept between steps (the interface of ``TrainStep``)."""

    def shard(self, rows: int, pad_to: int | None = None) -> tuple[slice, int]:
        """This rank's rows of a global batch of ``rows`` (a slice) and the shard size every
        rank pads to."""
        size = math.ceil(max(rows, pad_to or 0) / self.ranks)
        start = min(self.rank * size, rows)
        return slice(start, min(start + size, rows)), size

    def run(self, params, opt_state, state, x: Tensor, y: Tensor, *,
            weight: Tensor | None = None, key: Tensor | None = None,
            pad_to: int | None = None):
        """``(params, opt_state, loss, state)`` after one step on the global batch."""
        from fnmlp.train._compile import pad_rows  # no compiler: the shared padding

        mine, size = self.shard(x.shape[0], pad_to)
        xs, ys = x[mine], y[mine]
        ws = (torch.ones(xs.shape[0], dtype=x.dtype, device=x.device) if weight is None
              else weight[mine])
        xs, ys, ws = pad_rows(xs, size), pad_rows(ys, size), pad_rows(ws, size)
        param_leaves, param_spec = flatten(params)
        opt_leaves, opt_spec = flatten(opt_state)
        collective = self.collective or ("in_graph" if xs.device.type == "cpu" else "between")
        if self.compile and collective == "in_graph":
            step = self._fused_graph(param_spec, opt_spec, param_leaves, opt_leaves, [xs, ys, ws])
            outputs = collective_call(lambda: step(*param_leaves, *opt_leaves, xs, ys, ws),
                                      "the step's in-graph all-reduce")
        else:
            gradient, update = self._functions(param_spec, opt_spec, xs, ys, ws, param_leaves,
                                               opt_leaves)
            with torch.no_grad():
                bucket = gradient(*param_leaves, xs, ys, ws)
                bucket = all_reduce_sum(bucket, "the gradient all-reduce")
                outputs = update(*param_leaves, *opt_leaves, bucket)
        new_params = tree_builder(param_spec)(outputs[:len(param_leaves)])
        new_opt_state = tree_builder(opt_spec)(outputs[len(param_leaves):-1])
        return new_params, new_opt_state, outputs[-1], state

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
                prediction = forward(self.model, params, xs, self.model.state_or_default(None, None),
                                     EVAL)[0]
                value, _ = self.loss.forward(prediction, ys, weight)
                total = weight.sum() if self.mean else torch.ones((), dtype=x.dtype,
                                                                  device=x.device)
                pair = torch.stack([value * total, total])
            pair = all_reduce_sum(pair, "the validation loss all-reduce")
        return (pair[0] / pair[1]).item() if self.mean else pair[0].item()

    def _functions(self, param_spec, opt_spec, xs, ys, ws, param_leaves, opt_leaves):
        """The gradient and update functions, made once per shapes (compiled with
        ``compile``)."""
        specialization = (param_spec, opt_spec, *[(t.shape, t.dtype) for t in
                                                  (*param_leaves, *opt_leaves, xs, ys, ws)])
        graphs = self._graphs.get(specialization)
        if graphs is not None:
            return graphs
        gradient = self._gradient_function(param_spec)
        update = self._update_function(param_spec, opt_spec, [p.shape for p in param_leaves])
        if not self.compile:
            graphs = self._graphs[specialization] = (gradient, update)
        else:
            from fnmlp.train._compile import compile_graph

            with torch.no_grad():
                bucket = gradient(*param_leaves, xs, ys, ws)
                graphs = self._graphs[specialization] = (
                    compile_graph(gradient, [*param_leaves, xs, ys, ws], compiler="auto",
                                  cuda_graphs=False),
                    compile_graph(update, [*param_leaves, *opt_leaves, bucket],
                                  compiler="auto", cuda_graphs=False))
                graphs[0](*param_leaves, xs, ys, ws)  # compiles now where compiling is lazy
                graphs[1](*param_leaves, *opt_leaves, bucket)
            wait_for_all("waiting for every rank to compile its step", COMPILE_TIMEOUT)
        return graphs

    def _fused_graph(self, param_spec, opt_spec, param_leaves: list[Tensor],
                     opt_leaves: list[Tensor], data: list[Tensor]):
        """One compiled graph: the gradient, a functional all-reduce, the update."""
        args = [*param_leaves, *opt_leaves, *data]
        specialization = ("in_graph", param_spec, opt_spec, *[(t.shape, t.dtype) for t in args])
        graph = self._graphs.get(specialization)
        if graph is None:
            import torch.distributed as dist
            import torch.distributed._functional_collectives as collectives

            from fnmlp.train._compile import compile_graph

            gradient = self._gradient_function(param_spec)
            update = self._update_function(param_spec, opt_spec, [p.shape for p in param_leaves])
            count = len(param_leaves)

            def fnmlp_distributed_step(*args):
                params, opt_leaves, (x, y, w) = args[:count], args[count:-3], args[-3:]
                bucket = gradient(*params, x, y, w)
                bucket = collectives.wait_tensor(
                    collectives.all_reduce(bucket, "sum", dist.group.WORLD))
                return update(*params, *opt_leaves, bucket)

            with torch.no_grad():
                graph = self._graphs[specialization] = compile_graph(
                    fnmlp_distributed_step, args, compiler="auto", cuda_graphs=False)
            wait_for_all("waiting for every rank to compile its step", COMPILE_TIMEOUT)
        return graph

    def _gradient_function(self, param_spec):
        """``(*param_leaves, x, y, w) -> bucket``: [W_r·g..., W_r·loss, W_r] for a mean loss,
        [g..., loss, 1] for a summed one; zeros for a shard without weight."""
        build, model, loss, mean = tree_builder(param_spec), self.model, self.loss, self.mean
        state = model.state_or_default(None, None)

        def fnmlp_shard_gradient(*args):
            *leaves, x, y, w = args
            value, grads, _ = value_and_grad(model, build(list(leaves)), x, y, loss, state,
                                             weight=w)
            total = w.sum()
            scale = total if mean else torch.ones_like(total)
            pieces = [(g * scale).reshape(-1) for g in flatten(grads)[0]]
            bucket = torch.cat([*pieces, (value * scale).reshape(1), scale.reshape(1)])
            return torch.where(total > 0, bucket, torch.zeros_like(bucket))

        return fnmlp_shard_gradient

    def _update_function(self, param_spec, opt_spec, shapes):
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
            params, opt_state = optimizer.unchecked_update(params, grads, opt_state)
            return (*flatten(params)[0], *flatten(opt_state)[0], value)

        return fnmlp_update
