"""``Ensemble(model, size=K)``: K copies of one network, their parameters stacked on a leading
K axis, trained together.

Every function here is the single network's own function mapped over the members with
``torch.func.vmap`` (batching, not autodiff): the members' products become batched products and
their elementwise work one pass over (K, m, ·) tensors, while each member's arithmetic stays the
single network's. Member i of an ensemble is an ordinary network: ``member(params, i)`` gives
its params, and training it alone gives the same steps (see ``tests/test_ensemble.py`` for the
tolerances and where they are bit-identical).

Data is shared by all members, (m, ·), or per member, (K, m, ·); row weights likewise (m,) or
(K, m), which is how bagging works (``fit(bagging=True)``: bootstrap counts as weights).
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, NamedTuple, Sequence, cast

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch import Tensor
from torch.func import vmap

from fnmlp import _registry, _validate
from fnmlp._tree import flatten, tree_map
from fnmlp.nn import (EVAL, MLP, Context, CrossEntropy, Loss, check_l2, check_loss,
                      check_loss_weights, dropout_key, forward, mse, value_and_grad)


class Prediction(NamedTuple):
    """An ensemble's prediction: the members' ``mean`` and ``spread`` (their standard
    deviation, 0 for one member), (m, out), and every member's ``members`` (K, m, out)."""

    mean: Tensor
    spread: Tensor
    members: Tensor


@dataclasses.dataclass(frozen=True)
class Ensemble:
    """K members of ``model``'s architecture; parameters stacked on a leading K axis.

    ``fnmlp.Ensemble(model, size=8).init(generator)`` gives parameters whose leaves are
    (8, *leaf shape); member i is drawn from its own generator stream (``generators``).
    """

    model: MLP
    size: int

    def __post_init__(self):
        if not isinstance(self.model, MLP):
            raise TypeError(f"model must be an fnmlp.MLP, got {type(self.model).__name__}; "
                            "a torch.nn module converts with fnmlp.from_torch(module)")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"size must be a positive integer (members), got {self.size!r}")

    # --- parameters ---------------------------------------------------------------------------

    def generators(self, generator: torch.Generator) -> list[torch.Generator]:
        """One generator per member, seeded by K draws from ``generator``: member i's
        parameters are ``model.init(generators[i])``."""
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got "
                            f"{type(generator).__name__}")
        seeds = torch.randint(0, 2**62, (self.size,), generator=generator,
                              device=generator.device).tolist()
        return [torch.Generator(generator.device).manual_seed(seed) for seed in seeds]

    def init(self, generator: torch.Generator | None = None, *,
             dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
             init: str = "torch"):
        """Stacked parameters (leaves (K, ...)), member i from ``generators(generator)[i]``;
        arguments as ``MLP.init``."""
        if generator is None:
            generator = torch.Generator()
            generator.seed()
        members = [self.model.init(g, dtype=dtype, device=device, init=init)
                   for g in self.generators(generator)]
        return self.stack(members)

    def init_state(self, *, dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None):
        """K copies of ``model.init_state`` stacked (``()`` entries where stateless)."""
        return self.stack([self.model.init_state(dtype=dtype, device=device)] * self.size)

    def stack(self, members: Sequence[Any]):
        """One stacked tree from K trees of the same structure (params, states or optimizer
        states of single networks)."""
        if len(members) != self.size:
            raise ValueError(f"stack needs {self.size} members, got {len(members)}")
        return pytree.tree_map(lambda *leaves: torch.stack(leaves), *members)

    def member(self, tree, index: int):
        """Member ``index``'s part of a stacked tree (params, state or optimizer state): an
        ordinary single network's tree (views of the stacked tensors)."""
        index = operator.index(index)
        if not -self.size <= index < self.size:
            raise IndexError(f"member {index} of an ensemble of {self.size}")
        return tree_map(lambda leaf: leaf[index], tree)

    def check_params(self, params) -> Tensor:
        """Raise unless ``params`` are K stacked parameter trees of ``model``; return member
        0's first leaf (for dtype and device)."""
        self.check_stacked(params, "params")
        return self.model.check_params(self.member(params, 0))

    def check_stacked(self, tree, name: str) -> None:
        leaves = flatten(tree)[0]
        for leaf in leaves:
            if not isinstance(leaf, Tensor) or leaf.dim() == 0 or leaf.shape[0] != self.size:
                shape = tuple(leaf.shape) if isinstance(leaf, Tensor) else type(leaf).__name__
                raise ValueError(f"{name} must be stacked for {self.size} members (every leaf "
                                 f"(K={self.size}, ...)), got a leaf of shape {shape}; make "
                                 "them with Ensemble.init or Ensemble.stack")

    def init_optimizer(self, optimizer, params, *, lr=None):
        """The stacked optimizer state for ``params``; ``lr``: one learning rate for every
        member (default: the optimizer's) or K of them (a sweep in one step)."""
        self.check_params(params)
        state = self.stack([optimizer.init(self.member(params, 0))] * self.size)
        if lr is None:
            return state
        rates = self.per_member(lr, "lr", like=state.learning_rate)
        if not bool((rates > 0).all()) or not bool(torch.isfinite(rates).all()):
            raise ValueError(f"lr must be positive and finite, got {rates.tolist()}")
        return dataclasses.replace(state, learning_rate=rates)

    def per_member(self, value, name: str, like: Tensor) -> Tensor:
        """``value`` (a number or K of them) as a (K,) tensor like ``like``."""
        if isinstance(value, Tensor):
            value = value.detach().to(dtype=like.dtype, device=like.device).clone()
        else:
            value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
        if value.dim() == 0:
            value = value.expand(self.size).clone()
        if value.shape != (self.size,):
            raise ValueError(f"{name} must be one number or {self.size} (one per member), got "
                             f"shape {tuple(value.shape)}")
        return value

    def dropout_keys(self, seed: int, step: int, device=None) -> Tensor:
        """(K, 2) dropout keys for one step: member i's is ``fnmlp.dropout_key(seed,
        step·K + i)``, so a member trained alone with those keys draws the same masks."""
        return torch.stack([dropout_key(seed, step * self.size + i, device=device)
                            for i in range(self.size)])

    # --- data ---------------------------------------------------------------------------------

    def check_inputs(self, x, like: Tensor, name: str = "x", finite: bool = True,
                     sparse: bool = False):
        """``x`` as a tensor: (m, in) shared by the members or (K, m, in) one per member;
        ``sparse``: a SciPy sparse (m, in) stays CSR rows (``_validate.as_rows``) for the
        caller to densify a block of rows at a time."""
        if sparse and _validate.is_sparse(x):
            rows = _validate.as_rows(x, name, like)
            _validate.check_matrix(rows, name, self.model.in_features, "features")
            if finite:
                _validate.check_finite(rows, name)
            return rows
        x = _validate.as_data(x, name, like)
        if x.dim() == 3:
            if x.shape[0] != self.size:
                raise ValueError(f"per-member {name} must be (K={self.size}, rows, features), "
                                 f"got shape {tuple(x.shape)}")
            _validate.check_matrix(x[0], name, self.model.in_features, "features")
        else:
            _validate.check_matrix(x, name, self.model.in_features, "features")
        if finite:
            _validate.check_finite(x, name)
        return x

    def check_weights(self, weight, rows: int, like: Tensor) -> Tensor | None:
        """Row weights (rows,) for every member or (K, rows) one set per member (a member
        whose weights are all zero does not step)."""
        if weight is None:
            return None
        if getattr(weight, "ndim", 1) == 2:
            if not isinstance(weight, Tensor):
                weight = np.asarray(weight)  # as_weights orders and converts it, once
            if weight.shape[0] != self.size:
                raise ValueError(f"per-member sample_weight must be (K={self.size}, rows), got "
                                 f"shape {tuple(weight.shape)}")
            if weight.shape[1] != rows:
                raise ValueError(f"per-member sample_weight must have one weight per row "
                                 f"({self.size}, {rows}), got shape {tuple(weight.shape)}")
            # the cast: as_weights gives None only for None
            flat = cast(Tensor, _validate.as_weights(weight.reshape(-1), self.size * rows, like))
            return flat.reshape(self.size, rows)
        return _validate.as_weights(weight, rows, like)

    # --- pure functions -----------------------------------------------------------------------

    def apply(self, params, x, *, state=None, train: bool = False, key: Tensor | None = None
              ) -> Tensor:
        """Every member's predictions (K, m, out) for x (m, in) or per-member x (K, m, in);
        ``state``, ``train`` as ``MLP.apply`` (in evaluation mode x may be a SciPy sparse
        matrix, densified a block of rows at a time); ``key``: (K, 2) dropout keys in
        training."""
        like = self.check_params(params)
        _validate.check_no_autocast(like.device, "Ensemble.apply")
        x = self.check_inputs(x, like, sparse=not train)
        if _validate.is_sparse(x):
            return torch.cat([self.apply(params, dense, state=state)
                              for dense in _validate.dense_blocks(x, like)], dim=1)
        if state is None:
            if self.model.has_state and not train:
                raise ValueError("this model keeps running statistics (BatchNorm): pass "
                                 "state=ensemble.init_state(...) from training")
            state = self.init_state(dtype=like.dtype, device=like.device)
        else:
            self.check_stacked(state, "state")
        if key is not None and not (train and self.model.has_dropout):
            key = None
        if key is not None:
            key = self.check_keys(key, x.device)

        def member(p, s, x, k):
            context = Context(train=True, key=k) if train else EVAL
            return forward(self.model, p, x, s, context)[0]

        with torch.no_grad():
            return vmap(member, in_dims=(0, 0, 0 if x.dim() == 3 else None,
                                         None if key is None else 0))(params, state, x, key)

    def predict(self, params, x, *, state=None) -> Prediction:
        """The members' mean and spread (standard deviation), each (m, out), and every member's
        prediction (K, m, out), in evaluation mode."""
        members = self.apply(params, x, state=state)
        spread = (members.std(dim=0, correction=0) if self.size > 1
                  else torch.zeros_like(members[0]))
        return Prediction(members.mean(dim=0), spread, members)

    def value_and_grad(self, params, x, y, loss: Loss = mse, *, state=None,
                       key: Tensor | None = None, sample_weight=None, l2: float = 0.0):
        """Every member's loss (K,) and gradients (stacked like ``params``) by the explicit
        backward rules; arguments as ``MLP.value_and_grad``, each of x, y, ``sample_weight``
        shared ((m, ·)) or per member ((K, m, ·)), ``key`` (K, 2) (``dropout_keys``).
        Returns ``(losses, grads)``, or ``(losses, grads, new_state)`` when ``state`` is passed.
        """
        check_loss(loss)
        like = self.check_params(params)
        _validate.check_no_autocast(like.device, "Ensemble.value_and_grad")
        x, y, weight = self.check_batch(x, y, loss, sample_weight, like)
        model_state = self.check_model_state(state, like)
        key = self.check_keys(key, x.device) if self.model.has_dropout or key is not None \
            else None
        l2 = check_l2(l2)

        def member(p, s, x, y, w, k):
            return value_and_grad(self.model, p, x, y, loss, s, key=k, weight=w, l2=l2)

        dims = (0, 0, *batch_dims(x, y, weight, loss), None if key is None else 0)
        with torch.no_grad():
            values, grads, new_state = vmap(member, in_dims=dims)(params, model_state, x, y,
                                                                  weight, key)
        return (values, grads) if state is None else (values, grads, new_state)

    def train_step(self, loss: Loss, optimizer, *, compile: bool = True, weight_decay=None,
                   l2: float = 0.0, compiler: str = "auto", verify: bool = False,
                   threads="auto"):
        """``step(params, opt_state, x, y) -> (params, opt_state, losses (K,))``: every member's
        step in one call, one compiled graph with ``compile`` (no recompiles across steps,
        learning rates or active masks).

        Arguments:
            loss, optimizer: as ``fnmlp.train_step``; the optimizer state from
                ``init_optimizer`` holds each member's learning rate.
            weight_decay: one decay per member (a sweep), applied exactly where the optimizer
                applies its own ``weight_decay`` (which must then be 0).
            l2, compiler, verify, threads: as ``fnmlp.train_step`` (``threads="auto"`` measures
                the step by all members' work; None leaves torch's count alone).
        """
        from fnmlp.ensemble._step import EnsembleStep

        return EnsembleStep(self, loss, optimizer, compile=compile, weight_decay=weight_decay,
                            l2=l2, compiler=compiler, verify=verify, threads=threads)

    def losses(self, params, state, x: Tensor, y: Tensor, loss: Loss) -> Tensor:
        """Every member's loss (K,) on checked (x, y) in evaluation mode, unchecked."""
        def member(p, s):
            return loss(forward(self.model, p, x, s, EVAL)[0], y)

        with torch.no_grad():
            return vmap(member)(params, state)

    @staticmethod
    def first_leaf(tree) -> Tensor:
        """A leaf of a stacked tree (for its device and dtype)."""
        return flatten(tree)[0][0]

    def fit(self, params, x, y, **options):
        """Train every member through the one training loop; the options are
        ``fnmlp.ensemble.fit_ensemble``'s (``fnmlp.fit``'s, plus per-member rates, weight
        decays, row weights and bagging; ``callbacks=`` and ``metrics=`` with per-member values
        in the logs, and a plateau per member in ``ReduceLROnPlateau``)."""
        from fnmlp.ensemble._fit import fit_ensemble

        return fit_ensemble(self, params, x, y, **options)

    # --- checks shared with the step ----------------------------------------------------------

    def check_batch(self, x, y, loss: Loss, sample_weight, like: Tensor, finite: bool = True,
                    sparse: bool = False):
        """``(x, y, weight)`` validated: each shared or per member (``sparse``: as
        ``check_inputs``)."""
        x = self.check_inputs(x, like, finite=finite, sparse=sparse)
        per_member_y = per_member_targets(y, loss)
        if per_member_y:
            if y.shape[0] != self.size:
                raise ValueError(f"per-member y must have K={self.size} first, got shape "
                                 f"{tuple(y.shape)}")
            y = torch.stack([loss.check_target(t, self.model.out_features, like, "y")
                             for t in y])
        else:
            y = loss.check_target(y, self.model.out_features, like, "y")
        rows = x.shape[-2]
        if y.shape[int(per_member_y)] != rows:
            raise ValueError(f"x has {rows} rows but y has {y.shape[int(per_member_y)]}")
        for target in (y if per_member_y else [y]):
            if finite:
                loss.check_target_values(target, self.model.out_features, "y")
            else:  # class labels in range (a compiled graph cannot raise)
                loss.check_labels(target, self.model.out_features)
        check_loss_weights(loss, sample_weight)
        weight = self.check_weights(sample_weight, rows, like)
        self.check_training_rows(rows, weight)
        return x, y, weight

    def check_training_rows(self, rows: int, weight: Tensor | None, where: str = "") -> None:
        """Raise unless every member's batch has the rows of non-zero weight a primitive
        needs (``BatchNorm``: 2); a member without weight in it (no step) passes."""
        if not self.model.has_batch_statistics:
            return
        for member_weight in (weight if weight is not None and weight.dim() == 2
                              else [weight]):
            self.model.check_training_rows(rows, member_weight, where)

    def check_state(self, state, like: Tensor) -> None:
        """Raise unless ``state`` is K stacked states of ``model`` on ``like``'s dtype and
        device (``fnmlp.save`` and ``fnmlp.load`` check through this, as for an ``MLP``)."""
        self.check_stacked(state, "state")
        self.model.check_state(self.member(state, 0), like)

    def check_opt_state(self, optimizer, params, opt_state) -> None:
        """Raise unless ``opt_state`` is ``optimizer``'s stacked state for ``params``
        (``init_optimizer``'s)."""
        self.check_stacked(opt_state, "opt_state")
        optimizer.check(self.member(params, 0), None, self.member(opt_state, 0))

    def check_model_state(self, state, like: Tensor):
        if state is None:
            return self.stack([self.model.state_or_default(None, like)] * self.size)
        self.check_stacked(state, "state")
        self.model.check_state(self.member(state, 0), like)
        return state

    def check_keys(self, key, device) -> Tensor | None:
        if key is None:
            if self.model.has_dropout:
                raise ValueError("this model has dropout: pass key=ensemble.dropout_keys(seed, "
                                 "step) (K keys, new ones every step)")
            return None
        if not isinstance(key, Tensor) or key.shape != (self.size, 2) or key.dtype != torch.int64:
            raise TypeError(f"key must be ({self.size}, 2) int64 keys from "
                            f"ensemble.dropout_keys, got {key!r}")
        return key.to(device) if self.model.has_dropout else None


_registry.add(Ensemble, "model")  # savable: fnmlp.save(path, ensemble, stacked params, ...)


def per_member_targets(y, loss: Loss) -> bool:
    """Whether ``y`` holds one target set per member: (K, m) class labels for cross-entropy,
    (K, m, out) values otherwise (shared targets are (m,) labels or (m, out) values)."""
    if not hasattr(y, "ndim") or not hasattr(y, "dtype"):
        return False
    integer = (not y.is_floating_point() if isinstance(y, Tensor)
               else y.dtype.kind in "iub")
    return y.ndim == (2 if integer and isinstance(loss, CrossEntropy) else 3)


def batch_dims(x: Tensor, y: Tensor, weight: Tensor | None, loss: Loss) -> tuple:
    """vmap's ``in_dims`` for (x, y, weight): 0 where per member, None where shared."""
    return (0 if x.dim() == 3 else None, 0 if per_member_targets(y, loss) else None,
            None if weight is None or weight.dim() == 1 else 0)
