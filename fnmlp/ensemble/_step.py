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

from fnmlp import _validate
from fnmlp._tree import tree_map
from fnmlp.ensemble._ensemble import Ensemble
from fnmlp.nn import CrossEntropy, Loss, check_l2, value_and_grad
from fnmlp.optim import ClipByGlobalNorm, Optimizer
from fnmlp.train.engine import (BATCHED, Batch, Carry, Executor, Kernels, StepKind,
                                check_step_options, settle_thread)


def member_step(ensemble: Ensemble, loss: Loss, optimizer, l2: float, kernels: Kernels):
    """The step of one member, ``(params, opt_state, state, x, y, weight, key, active, decay) ->
    ((params, opt_state, state), loss)``, to be mapped over the members."""
    model = ensemble.model
    decoupled = getattr(optimizer, "decoupled", False)

    def step(params, opt_state, state, x, y, weight, key, active, decay):
        value, grads, new_state = value_and_grad(model, params, x, y, loss, state, key=key,
                                                 weight=weight, l2=l2,
                                                 lane_order_sums=kernels.lane_order_sums)
        decayed = params
        if decay is not None:  # exactly where the optimizer applies its own weight_decay
            if decoupled:
                scale = 1 - optimizer.learning_rate(opt_state) * decay
                decayed = tree_map(lambda p: p * scale, params)
            else:
                grads = tree_map(lambda g, p: g + p * decay, grads, params)
        new_params, new_opt_state = optimizer.unchecked_update(decayed, grads, opt_state,
                                                               fused=kernels.fused_optimizer)
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


def _per_member(item, members_dim: int) -> int | None:
    return None if item is None or item[0] != members_dim else 0


class EnsembleStep(StepKind):
    """``step(params, opt_state, x, y) -> (params, opt_state, losses)`` for all members; see
    ``Ensemble.train_step``. Its data: ``[x, y, weight, active, decay, key]``."""

    model: Ensemble
    optimizer: Optimizer | ClipByGlobalNorm

    def __init__(self, ensemble: Ensemble, loss: Loss, optimizer, *, compile: bool = True,
                 weight_decay=None, l2: float = 0.0, compiler: str = "auto",
                 verify: bool = False, threads="auto", flush_denormals: bool = True):
        check_step_options(loss, optimizer, compiler, compile)
        self.ensemble, self.model, self.loss, self.optimizer = (ensemble, ensemble, loss,
                                                                optimizer)
        self.members = ensemble.size
        self.l2 = check_l2(l2)
        self.weight_decay = check_weight_decay(ensemble, optimizer, weight_decay)
        identity = ("ensemble", ensemble, loss, optimizer.structure, self.l2,
                    None if self.weight_decay is None else tuple(self.weight_decay), compiler)
        self.executor = Executor(identity, self._function, self._row_axes, compile=compile,
                                 compiler=compiler, verify=verify, cuda_graphs=None,
                                 threads=threads, model=ensemble.model, members=ensemble.size,
                                 eager_kernels=BATCHED, flush_denormals=flush_denormals,
                                 stateless=not ensemble.model.has_state)
        self.compile = self.executor.compiled
        self._decay: dict[tuple, Tensor] = {}
        self._ones: dict[tuple, Tensor] = {}

    def _function(self, kernels: Kernels, layout: tuple):
        """The step of every member: ``(carry, x, y, weight, active, decay, key) -> (carry,
        losses)``, the member step mapped over what ``layout`` says is per member."""
        x, y, weight, active, decay, key = layout
        y_per_member = y[0] == (2 if not y[1].is_floating_point and isinstance(
            self.loss, CrossEntropy) else 3)
        dims = (0, 0, 0, _per_member(x, 3), 0 if y_per_member else None,
                _per_member(weight, 2), None if key is None else 0,
                None if active is None else 0, None if decay is None else 0)
        member = vmap(member_step(self.ensemble, self.loss, self.optimizer, self.l2, kernels),
                      in_dims=dims)

        def step(carry, x, y, weight, active, decay, key):
            return member(*carry, x, y, weight, key, active, decay)

        return step

    def _row_axes(self, layout: tuple) -> tuple:
        x, y, weight = layout[:3]
        y_axis = 1 if y[0] == (2 if not y[1].is_floating_point and isinstance(
            self.loss, CrossEntropy) else 3) else 0
        return (x[0] - 2, y_axis, None if weight is None else weight[0] - 1, None, None, None)

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
        settle_thread()  # ~0.1 µs once this thread is known
        ensemble = self.ensemble
        like = ensemble.check_params(params)
        _validate.check_no_autocast(like.device, "the ensemble's training step")
        ensemble.check_stacked(opt_state, "opt_state")
        self.optimizer.check(ensemble.member(params, 0), None, ensemble.member(opt_state, 0))
        x, y, weight = ensemble.check_batch(x, y, self.loss, sample_weight, like, finite=False)
        model_state = ensemble.check_model_state(state, like)
        key = ensemble.check_keys(key, x.device) if ensemble.model.has_dropout else None
        if active is not None:
            active = torch.as_tensor(active, device=like.device)
            if active.shape != (ensemble.size,) or active.dtype != torch.bool:
                raise ValueError(f"active must be {ensemble.size} booleans, got "
                                 f"{tuple(active.shape)} {active.dtype}")
        new, losses = self.run(Carry(params, opt_state, model_state),
                               Batch(x, y, weight, key, x.shape[-2], None, ()), active)
        return (new.params, new.opt_state, losses) if state is None else (
            new.params, new.opt_state, losses, new.state)

    def run(self, carry: Carry, batch: Batch, active: Tensor | None = None):
        """``(carry, losses)``: ``__call__`` without its checks (the loop's step)."""
        return self.executor(carry, self._data(batch, active), batch.rows, batch.pad_to)

    def run_chunk(self, carry: Carry, batches, active: Tensor | None = None):
        """``(carry, losses)`` after a step on each batch ((N, K) losses): compiled, one graph
        for all."""
        return self.executor.run_chunk(carry, [self._data(b, active) for b in batches],
                                       [b.rows for b in batches], batches[0].pad_to)

    def _data(self, batch: Batch, active: Tensor | None) -> list:
        x, weight = batch.x, batch.weight
        if active is None and (self.compile or (weight is not None and weight.dim() == 2)):
            # compiled: one graph for every mask; per-member weights: a member may have no
            # weight in this batch and must not step
            active = self._constant(self.ensemble.size, torch.bool, x.device)
        return [x, batch.y, weight, active, self._decay_for(x), batch.key]

    def _decay_for(self, like: Tensor) -> Tensor | None:
        if self.weight_decay is None:
            return None
        where = (like.dtype, like.device)
        decay = self._decay.get(where)
        if decay is None:
            decay = self._decay[where] = torch.tensor(self.weight_decay, dtype=like.dtype,
                                                      device=like.device)
        return decay

    def _constant(self, size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """A (size,) tensor of ones, made once (graph inputs are never written)."""
        ones = self._ones.get((size, dtype, device))
        if ones is None:
            ones = self._ones[(size, dtype, device)] = torch.ones(size, dtype=dtype,
                                                                  device=device)
        return ones

    # --- what the loop needs ------------------------------------------------------------

    def dropout_key(self, seed: int, step: int, device: torch.device) -> Tensor:
        return self.ensemble.dropout_keys(seed, step, device=device)

    def valid_losses(self, carry: Carry, x: Tensor, y: Tensor) -> list[float]:
        return self.ensemble.losses(carry.params, carry.state, x, y, self.loss).tolist()

    def select(self, keep, new, old):
        mask = torch.tensor(list(keep), device=self.ensemble.first_leaf(new).device)
        return select_members(mask, new, old)

    def forget(self) -> None:
        self.executor.forget()

    def pin_threads(self, extras: dict, rows: int, device: torch.device) -> None:
        self.executor.threads.pin(extras, rows, device)


def select_members(mask: Tensor, new, old):
    """Per member: ``new`` where ``mask`` (K,) holds, else ``old``."""
    def pick(a: Tensor, b: Tensor) -> Tensor:
        return torch.where(mask.view(-1, *[1] * (a.dim() - 1)), a, b)

    return tree_map(pick, new, old)
