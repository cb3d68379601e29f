"""The ensemble's training step: all K members' forward, backward and update in one call, eager
or compiled into one graph.

Per member it is the single network's step (``value_and_grad`` then ``optimizer._update``)
mapped with ``torch.func.vmap``, plus what an ensemble adds: a per-member learning rate (the
optimizer state's rate is (K,)), a per-member weight decay, per-member data and dropout keys,
and an ``active`` mask: a member that is not active (stopped early) keeps its parameters,
optimizer state and model state, while the graph stays the same.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import vmap

from fnmlp._tree import flatten, tree_builder, tree_map
from fnmlp.ensemble._ensemble import Ensemble, batch_dims, per_member_targets
from fnmlp.nn._losses import Loss
from fnmlp.nn._model import check_loss, check_l2, value_and_grad
from fnmlp.optim._optimizers import ClipByGlobalNorm, Optimizer
from fnmlp.train._step import COMPILERS
from fnmlp.train._threads import StepThreads


def member_step(ensemble: Ensemble, loss: Loss, optimizer, l2: float):
    """The step of one member, ``(params, opt_state, state, x, y, weight, key, active, decay) ->
    ((params, opt_state, state), loss)``, to be mapped over the members."""
    model = ensemble.model
    decoupled = getattr(optimizer, "decoupled", False)

    def step(params, opt_state, state, x, y, weight, key, active, decay):
        value, grads, new_state = value_and_grad(model, params, x, y, loss, state, key=key,
                                                 weight=weight, l2=l2)
        decayed = params
        if decay is not None:  # exactly where the optimizer applies its own weight_decay
            if decoupled:
                scale = 1 - optimizer.learning_rate(opt_state) * decay
                decayed = tree_map(lambda p: p * scale, params)
            else:
                grads = tree_map(lambda g, p: g + p * decay, grads, params)
        new_params, new_opt_state = optimizer.unchecked_update(decayed, grads, opt_state)
        new = (new_params, new_opt_state, new_state)
        if active is None:
            return new, value
        live = active if weight is None else active & (weight.sum() > 0)
        old = (params, opt_state, state)
        kept = tree_map(lambda n, o: torch.where(live, n, o), new, old)
        if weight is not None:  # a batch without weight for this member: no step, loss 0
            value = torch.where(weight.sum() > 0, value, torch.zeros_like(value))
        return kept, value

    return step


def check_weight_decay(ensemble: Ensemble, optimizer, weight_decay) -> list[float] | None:
    """Per-member weight decays as floats, after checking the optimizer can take them."""
    if weight_decay is None:
        return None
    if isinstance(optimizer, ClipByGlobalNorm):
        raise ValueError("per-member weight_decay cannot be combined with clip_by_global_norm "
                         "(the decay would be clipped too); pass weight_decay to the optimizer")
    if not hasattr(optimizer, "weight_decay"):
        raise ValueError(f"{type(optimizer).__name__} has no weight decay")
    if optimizer.weight_decay != 0:
        raise ValueError(f"per-member weight_decay replaces the optimizer's: make it with "
                         f"weight_decay=0, got {optimizer.weight_decay}")
    if getattr(optimizer, "maximize", False):
        raise ValueError("per-member weight_decay is not supported with maximize=True")
    values = torch.as_tensor(weight_decay, dtype=torch.float64)
    if values.dim() == 0:
        values = values.expand(ensemble.size)
    if values.shape != (ensemble.size,):
        raise ValueError(f"weight_decay must be one number or {ensemble.size} (one per member), "
                         f"got shape {tuple(values.shape)}")
    if not bool(torch.isfinite(values).all()) or bool((values < 0).any()):
        raise ValueError(f"weight_decay must be finite and >= 0, got {values.tolist()}")
    return values.tolist()


class EnsembleStep:
    """``step(params, opt_state, x, y) -> (params, opt_state, losses)`` for all members; see
    ``Ensemble.train_step``."""

    def __init__(self, ensemble: Ensemble, loss: Loss, optimizer, *, compile: bool = True,
                 weight_decay=None, l2: float = 0.0, compiler: str = "auto"):
        check_loss(loss)
        if compiler not in COMPILERS:
            raise ValueError(f"compiler must be one of {COMPILERS}, got {compiler!r}")
        if not isinstance(optimizer, (Optimizer, ClipByGlobalNorm)):
            raise TypeError(f"optimizer must be an fnmlp optimizer such as fnmlp.sgd(0.01), "
                            f"got {optimizer!r}")
        self.ensemble, self.loss, self.optimizer = ensemble, loss, optimizer
        self.l2 = check_l2(l2)
        self.weight_decay = check_weight_decay(ensemble, optimizer, weight_decay)
        self.compile, self.compiler = compile, compiler
        self._step = member_step(ensemble, loss, optimizer, self.l2)
        self._threads = StepThreads("auto", ensemble.model, members=ensemble.size)
        self._graphs: dict[tuple, object] = {}
        self._decay: dict[tuple, Tensor] = {}
        self._rows: dict[tuple, int] = {}  # data layout -> rows of its compiled graph
        self._constants: dict[tuple, Tensor] = {}

    def __call__(self, params, opt_state, x, y, *, state=None, sample_weight=None,
                 key: Tensor | None = None, active=None):
        """One step of every member.

        Arguments:
            params, opt_state: stacked (``Ensemble.init``, ``Ensemble.init_optimizer``).
            x, y: shared by the members ((m, in), (m, ·)) or one per member ((K, m, ·)).
            state: the stacked model state (with ``BatchNorm``); then returned as a fourth
                value.
            sample_weight: (m,) or (K, m) row weights (bagging: bootstrap counts).
            key: (K, 2) dropout keys (``Ensemble.dropout_keys``), with dropout.
            active: (K,) booleans; a member that is not active keeps everything (default: all
                active).

        Returns ``(params, opt_state, losses)`` (``losses`` (K,)), plus the new state when
        ``state`` is given.
        """
        ensemble = self.ensemble
        like = ensemble.check_params(params)
        ensemble._check_stacked(opt_state, "opt_state")
        self.optimizer.check(ensemble.member(params, 0), None, ensemble.member(opt_state, 0))
        x, y, weight = ensemble.check_batch(x, y, self.loss, sample_weight, like, finite=False)
        model_state = ensemble.check_model_state(state, like)
        key = ensemble._check_keys(key, x.device) if ensemble.model.has_dropout else None
        if active is not None:
            active = torch.as_tensor(active, device=like.device)
            if active.shape != (ensemble.size,) or active.dtype != torch.bool:
                raise ValueError(f"active must be {ensemble.size} booleans, got "
                                 f"{tuple(active.shape)} {active.dtype}")
        params, opt_state, losses, new_state = self.run(params, opt_state, model_state, x, y,
                                                        weight=weight, key=key, active=active)
        return (params, opt_state, losses) if state is None else (params, opt_state, losses,
                                                                  new_state)

    def run(self, params, opt_state, state, x: Tensor, y: Tensor, *,
            weight: Tensor | None = None, key: Tensor | None = None,
            active: Tensor | None = None):
        """``(params, opt_state, losses, state)``: ``__call__`` without its checks; on one
        thread when all members' step is small (``fnmlp.train_step``'s ``threads="auto"``)."""
        with self._threads(x.shape[-2], x.device):
            return self._run(params, opt_state, state, x, y, weight, key, active)

    def _run(self, params, opt_state, state, x, y, weight, key, active):
        like = x
        decay = self._decay_for(like)
        if active is None and weight is not None and weight.dim() == 2:
            # a member may have no weight in this batch: it must not step
            active = torch.ones(self.ensemble.size, dtype=torch.bool, device=x.device)
        if not self.compile:
            dims = (0, 0, 0, *batch_dims(x, y, weight, self.loss), None if key is None else 0,
                    None if active is None else 0, None if decay is None else 0)
            with torch.no_grad():
                (params, opt_state, state), losses = vmap(self._step, in_dims=dims)(
                    params, opt_state, state, x, y, weight, key, active, decay)
            return params, opt_state, losses, state
        return self._run_compiled(params, opt_state, state, x, y, weight, key, active, decay)

    def _decay_for(self, like: Tensor) -> Tensor | None:
        if self.weight_decay is None:
            return None
        where = (like.dtype, like.device)
        decay = self._decay.get(where)
        if decay is None:
            decay = self._decay[where] = torch.tensor(self.weight_decay, dtype=like.dtype,
                                                      device=like.device)
        return decay

    def _run_compiled(self, params, opt_state, state, x, y, weight, key, active, decay):
        from fnmlp.train._compile import compile_graph, pad_rows

        size, rows = self.ensemble.size, x.shape[-2]
        if weight is None:
            weight = self._ones(rows, x.dtype, x.device)
        if active is None:
            active = self._ones(size, torch.bool, x.device)
        layout = (x.dim(), y.dim(), weight.dim(), x.dtype, x.device)
        target = max(rows, self._rows.get(layout, 0))
        if target > rows:  # a short batch runs padded (weight 0) in the graph compiled already
            x = pad_rows(x, target, x.dim() - 2)
            y = pad_rows(y, target, int(per_member_targets(y, self.loss)))
            weight = pad_rows(weight, target, weight.dim() - 1)
        self._rows[layout] = target
        leaves, spec = flatten((params, opt_state, state))
        data = [x, y, weight, active] + ([decay] if decay is not None else []) + (
            [key] if key is not None else [])
        args = [t.contiguous() for t in (*leaves, *data)]
        specialization = (spec, *[(t.shape, t.dtype) for t in args], torch.get_num_threads(),
                          x.device)
        graph = self._graphs.get(specialization)
        if graph is None:
            function = self._flat_function(spec, x.dim() == 3, per_member_targets(y, self.loss),
                                           weight.dim() == 2,
                                           decay is not None, key is not None)
            with torch.no_grad():
                graph = self._graphs[specialization] = compile_graph(
                    function, args, compiler=self.compiler, cuda_graphs=False)
        with torch.no_grad():
            outputs = list(graph(*args))
        params, opt_state, state = tree_builder(spec)(outputs[:-1])
        return params, opt_state, outputs[-1], state

    def _ones(self, size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """A (size,) tensor of ones, made once (graph inputs are never written)."""
        ones = self._constants.get((size, dtype, device))
        if ones is None:
            ones = self._constants[(size, dtype, device)] = torch.ones(size, dtype=dtype,
                                                                       device=device)
        return ones

    def _flat_function(self, spec, x_per_member: bool, y_per_member: bool,
                       weight_per_member: bool,
                       decayed: bool, keyed: bool):
        """The step over flat tensors: ``(*leaves, x, y, weight, active[, decay][, key]) ->
        (*leaves, losses)``."""
        from fnmlp.train._compile import with_own_code

        build, step = tree_builder(spec), self._step
        dims = (0, 0, 0, 0 if x_per_member else None,
                0 if y_per_member else None, 0 if weight_per_member else None,
                0 if keyed else None, 0, 0 if decayed else None)
        extra = int(decayed) + int(keyed)

        def fnmlp_ensemble_step(*args):
            leaves, data = args[:len(args) - 4 - extra], args[len(args) - 4 - extra:]
            x, y, weight, active = data[:4]
            decay = data[4] if decayed else None
            key = data[-1] if keyed else None
            params, opt_state, state = build(list(leaves))
            new, losses = vmap(step, in_dims=dims)(params, opt_state, state, x, y, weight, key,
                                                   active, decay)
            return (*flatten(new)[0], losses)

        return with_own_code(fnmlp_ensemble_step)
