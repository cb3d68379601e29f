"""The network: ``MLP``, a serial composition of primitives, and its pure functions.

The spec is static and hashable. Parameters are a tuple with one entry per primitive (its
params pytree, ``()`` for an activation); so is the state (``()`` for a stateless primitive).
``Dense`` is sugar: ``Dense(32, "relu", layer_norm=True, dropout=0.1)`` expands to
``Linear(32), LayerNorm(), ReLU(), Dropout(0.1)``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, Sequence, cast

import torch
from torch import Tensor

from fnmlp import _validate
from fnmlp._tree import flatten, tree_map
from fnmlp.nn._activations import Activation, Identity, get_activation
from fnmlp.nn._dropout import Dropout
from fnmlp.nn._init import get_initializer
from fnmlp.nn._linear import Linear
from fnmlp.nn._losses import BinaryCrossEntropyWithLogits, CrossEntropy, Loss, mse
from fnmlp.nn._norm import LayerNorm, check_eps
from fnmlp.nn._primitive import EVAL, Context, Primitive

Params = tuple  # one params pytree per primitive
State = tuple  # one state pytree per primitive


@dataclasses.dataclass(frozen=True)
class Dense:
    """Sugar for the usual layer: ``Linear(units)``, then optionally ``LayerNorm``, then the
    activation (none for the identity), then optionally ``Dropout``.

    Arguments:
        units: the layer's output width.
        activation: a name (identity/linear, relu, leaky_relu, elu, gelu, gelu_tanh, silu,
            softplus, sigmoid, tanh, softmax, log_softmax) or an activation instance such as
            ``fnmlp.LeakyReLU(0.2)``; None is the identity.
        layer_norm: normalize z over its features (learnable scale and shift, ``norm_eps``).
        dropout: probability of zeroing an activation while training (0 <= p < 1).
        init: this layer's initializer, overriding the one given to ``MLP.init``.
        norm_eps: the layer norm's ``eps``.
    """

    units: int
    activation: Activation | str | None = None
    layer_norm: bool = False
    dropout: float = 0.0
    init: str | None = None
    norm_eps: float = 1e-5

    def __post_init__(self):
        _validate.check_positive_int(self.units, "units")
        object.__setattr__(self, "activation", get_activation(self.activation))
        if not isinstance(self.layer_norm, bool):
            raise TypeError(f"layer_norm must be True or False, got {self.layer_norm!r}")
        object.__setattr__(self, "dropout", Dropout(self.dropout).p)  # named "dropout" there
        if self.init is not None:
            if not isinstance(self.init, str):
                raise TypeError(f"init must be an initializer name or None, got "
                                f"{type(self.init).__name__}")
            get_initializer(self.init)
        check_eps(self.norm_eps, "norm_eps")  # here, under its own name, even without a norm

    def primitives(self) -> list[Primitive]:
        """The sequence this layer stands for."""
        sequence: list[Primitive] = [Linear(self.units, self.init)]
        if self.layer_norm:
            sequence.append(LayerNorm(self.norm_eps))
        # the cast: __post_init__ made the field an Activation (it accepts names and None)
        activation = cast(Activation, self.activation)
        if activation.name != "identity":
            sequence.append(activation)
        if self.dropout:
            sequence.append(Dropout(self.dropout))
        return sequence


def _expand(layers) -> tuple[Primitive, ...]:
    """Primitives for a sequence of primitives, activation names and ``Dense`` layers; each
    ``Dropout`` gets its position as its mask stream."""
    sequence: list[Primitive] = []
    for i, layer in enumerate(layers):
        if isinstance(layer, Dense):
            sequence.extend(layer.primitives())
        elif isinstance(layer, Primitive):
            sequence.append(layer)
        elif isinstance(layer, str):
            sequence.append(get_activation(layer))
        else:
            raise TypeError(f"layers[{i}] must be an fnmlp primitive (Linear, an activation, "
                            f"LayerNorm, BatchNorm, Dropout), an activation name or a Dense, "
                            f"got {type(layer).__name__}")
    return tuple(dataclasses.replace(p, stream=i) if isinstance(p, Dropout) and p.stream is None
                 else p for i, p in enumerate(sequence))


@dataclasses.dataclass(frozen=True)
class MLP:
    """A network of ``in_features`` inputs followed by ``layers`` in series.

    Arguments:
        in_features: width of the input x (m, in_features).
        layers: primitives (``Linear``, activations or their names, ``LayerNorm``,
            ``BatchNorm``, ``Dropout``) and ``Dense`` layers, which expand into primitives;
            widths are inferred from ``in_features`` on.

    Example: ``MLP(6, [Dense(32, "tanh"), Dense(3)])`` and ``MLP(6, [Linear(32), "tanh",
    Linear(3)])`` are the same network, mapping (m, 6) to (m, 3).
    """

    in_features: int
    layers: tuple[Primitive, ...]
    if TYPE_CHECKING:  # set by __init__ and has_state, derived from the fields (not fields)
        _widths: tuple[int, ...]
        _has_dropout: bool
        _min_training_rows: int
        _no_state: State | None  # the stateless model's state (None when it keeps state)

    def __init__(self, in_features: int, layers: Sequence[Primitive | Dense | str]):
        _validate.check_positive_int(in_features, "in_features")
        if isinstance(layers, (str, Primitive, Dense)) or not isinstance(layers, Sequence):
            raise TypeError("layers must be a list of primitives and Dense layers")
        sequence = _expand(layers)
        if not sequence:
            raise ValueError("an MLP needs at least one layer")
        object.__setattr__(self, "in_features", int(in_features))
        object.__setattr__(self, "layers", sequence)
        widths = [self.in_features]
        for layer in sequence:
            widths.append(layer.out_features(widths[-1]))
        # derived from the fields, cached (not fields: equality and hashing ignore them)
        object.__setattr__(self, "_widths", tuple(widths))
        object.__setattr__(self, "_has_dropout", any(layer.uses_key for layer in sequence))
        object.__setattr__(self, "_min_training_rows",
                           max(layer.min_training_rows for layer in sequence))

    @property
    def widths(self) -> list[int]:
        """The width entering each primitive, then the output width."""
        return list(self._widths)

    @property
    def out_features(self) -> int:
        return self._widths[-1]

    @property
    def has_dropout(self) -> bool:
        """Whether a primitive draws from the dropout key."""
        return self._has_dropout

    @property
    def has_batch_statistics(self) -> bool:
        """Whether a primitive needs several rows per training batch (``BatchNorm``)."""
        return self._min_training_rows > 1

    @property
    def has_state(self) -> bool:
        """Whether a primitive keeps state (``BatchNorm``'s running statistics)."""
        has_state = self.__dict__.get("_has_state")
        if has_state is None:
            template = _templates(self)
            has_state = bool(template.state_leaves)
            object.__setattr__(self, "_has_state", has_state)
            object.__setattr__(self, "_no_state", None if has_state else template.state)
        return has_state

    # --- parameters and state ---------------------------------------------------------------

    def init(
        self,
        generator: torch.Generator | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        init: str = "torch",
    ) -> Params:
        """Fresh parameters, one entry per primitive, drawn from ``generator`` (a new, randomly
        seeded one if None).

        Arguments:
            generator: the only source of randomness; its device is where values are drawn.
            dtype: a floating dtype for every parameter.
            device: where the parameters live (default: the generator's device).
            init: how ``Linear`` layers without their own initializer draw: "torch" (as
                ``nn.Linear``), "normal" (the seed notebook's N(0, 1)), "xavier_uniform",
                "xavier_normal", "kaiming_uniform", "kaiming_normal" (biases zero) or "zeros".
        """
        _check_dtype(dtype)
        get_initializer(init)
        if generator is None:
            generator = torch.Generator()
            generator.seed()
        elif not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        device = torch.device(device) if device is not None else generator.device
        params = []
        for layer, n_in in zip(self.layers, self.widths):
            if getattr(layer, "initializer", "") is None:  # Linear's field (or a user's)
                layer = dataclasses.replace(cast(Any, layer), initializer=init)
            params.append(layer.init(generator, n_in, dtype, device)[1])
        return tuple(params)

    def init_state(self, *, dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None) -> State:
        """The initial state, one entry per primitive (``()`` where stateless): ``BatchNorm``'s
        running mean 0 and variance 1, as ``nn.BatchNorm1d`` starts."""
        _check_dtype(dtype)
        device = torch.device(device) if device is not None else torch.device("cpu")
        return tuple(layer.init_state(n_in, dtype, device)
                     for layer, n_in in zip(self.layers, self.widths))

    def check_params(self, params: Params) -> Tensor:
        """Raise unless ``params`` fits this spec; return one leaf (for dtype and device)."""
        return _check_tree(params, "params", self)

    def check_state(self, state: State, like: Tensor | None) -> None:
        """Raise unless ``state`` fits this spec, on ``like``'s dtype and device (None: on
        one dtype and device, its first leaf's)."""
        _check_tree(state, "state", self, like=like)

    def check_data(self, params: Params, x, y=None, *, loss: Loss = mse, finite: bool = True,
                   like: Tensor | None = None, names: tuple[str, str] = ("x", "y"),
                   sparse: bool = False) -> tuple[Tensor, Tensor | None]:
        """Validated (x, y) as tensors on the parameters' device (x in their dtype, y as
        ``loss`` wants it), by the input rule of ``fnmlp._validate.as_data``.

        Arguments:
            params: the parameters (checked unless ``like`` is given).
            x, y: the data; y None for inference.
            loss: the loss y is checked for.
            finite: also check value by value (NaN, inf, label ranges).
            like: a leaf of known-good params, which are then not checked again.
            names: x's and y's names in error messages.
            sparse: keep a SciPy sparse x as CSR rows (``_validate.as_rows``), for a caller
                that densifies it a block of rows at a time; else it is refused.
        """
        if like is None:
            like = self.check_params(params)
        x_name, y_name = names
        x = (_validate.as_rows if sparse else _validate.as_data)(x, x_name, like)
        _validate.check_matrix(x, x_name, self.in_features, "features")
        if y is not None:
            y = loss.check_target(y, self.out_features, like, y_name)
            _validate.check_rows(x, y, x_name, y_name)
        if finite:
            _validate.check_finite(x, x_name)
            if y is not None:
                loss.check_target_values(y, self.out_features, y_name)
        return x, y

    def check_training_rows(self, rows: int, weight: Tensor | None = None,
                            where: str = "") -> None:
        """Raise unless a training batch of ``rows`` rows (``weight``: their weights) has the
        rows of non-zero weight a primitive needs (``BatchNorm``: 2, for a variance); a batch
        where every row weighs 0 is skipped by ``fit``, and passes."""
        need = self._min_training_rows
        if need <= 1:
            return
        counted = rows if weight is None else int((weight != 0).sum())
        if counted < need and not (weight is not None and counted == 0):
            layer = next(type(layer).__name__ for layer in self.layers
                         if layer.min_training_rows == need)
            raise ValueError(f"{layer} needs at least {need} rows of non-zero weight per "
                             f"training batch, got {counted}{where}")

    def check_key(self, key, device: torch.device | None = None) -> Tensor | None:
        """The dropout key to train with, on ``device``: required when a layer has dropout;
        None without."""
        if key is None:
            if self.has_dropout:
                raise ValueError("this model has dropout: pass key=fnmlp.dropout_key(seed, step) "
                                 "(a new counter for every step)")
            return None
        if not isinstance(key, Tensor) or key.shape != (2,) or key.dtype != torch.int64:
            raise TypeError(f"key must come from fnmlp.dropout_key, got {key!r}")
        if not self.has_dropout:
            return None  # without dropout a key draws nothing
        return key if device is None else key.to(device)

    def state_or_default(self, state, like: Tensor | None) -> State:
        """``state`` checked against ``like``, or when None the state of a stateless model (no
        tensors: one object for every call)."""
        if state is None:
            if self.has_state:
                raise ValueError("this model keeps running statistics (BatchNorm): pass "
                                 "state=model.init_state(...) and keep the state it returns")
            return cast(State, self._no_state)  # a tuple: the model keeps no state
        self.check_state(state, like)
        return state

    # --- pure functions ---------------------------------------------------------------------

    def apply(self, params: Params, x, *, state: State | None = None, train: bool = False,
              key: Tensor | None = None) -> Tensor:
        """Predictions (m, out_features) for x (m, in_features).

        Arguments:
            params: from ``init`` (or training).
            x: (m, in_features) inputs: a tensor on the parameters' device, a NumPy array,
                a DataFrame or a list, of any real dtype (taken in the parameters' dtype:
                ``fnmlp._validate.as_data``); in evaluation mode also a SciPy sparse matrix,
                densified a block of rows at a time (bounded memory, the same result).
            state: the running statistics, required in evaluation when the model has
                ``BatchNorm``.
            train: training-mode behaviour (batch statistics; dropout with ``key``); by
                default evaluation mode.
        """
        like = self.check_params(params)
        _validate.check_no_autocast(like.device, "MLP.apply")
        x, _ = self.check_data(params, x, like=like, sparse=not train)
        return self.predict_rows(params, x, like, state) if _validate.is_sparse(x) else \
            self.unchecked_apply(params, x, like, state, train, key)

    def predict_rows(self, params: Params, rows, like: Tensor, state,
                     block: int | None = None) -> Tensor:
        """Evaluation-mode predictions for checked CSR rows (``_validate.as_rows``), densified
        ``block`` rows at a time (default: 64 MiB of dense rows, ``_validate.block_rows``).

        Arguments:
            params, state: as ``apply`` (checked).
            rows: the CSR rows.
            like: a parameter leaf (dtype and device).
            block: rows densified at a time.
        """
        parts = [self.unchecked_apply(params, dense, like, state, False, None)
                 for dense in _validate.dense_blocks(rows, like, block)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def unchecked_apply(self, params: Params, x: Tensor, like: Tensor, state, train: bool,
                 key) -> Tensor:
        """``apply`` after the parameter and data checks."""
        if state is None and (train or not self.has_state):
            state = self.init_state(dtype=like.dtype, device=like.device)
        else:
            state = self.state_or_default(state, like)
        if train:  # dropout only with a key, as the docstring says
            key = None if key is None else self.check_key(key, x.device)
            context = Context(train=True, key=key)
        else:
            context = EVAL
        with torch.no_grad():
            return forward(self, params, x, state, context)[0]

    def value_and_grad(self, params: Params, x, y, loss: Loss = mse, *,
                       state: State | None = None, key: Tensor | None = None,
                       sample_weight=None, l2: float = 0.0):
        """The loss and its gradients by the explicit backward rules (no autograd).

        Arguments:
            params: the parameters (one entry per primitive).
            x: (m, in_features) inputs; y: targets as ``loss`` wants them ((m, out_features),
                or (m,) class labels for cross-entropy).
            loss: an fnmlp loss (default ``fnmlp.mse``).
            state: the model's state; required with ``BatchNorm``. When given, the new state is
                returned as a third value.
            key: the dropout key (``fnmlp.dropout_key``), required with dropout.
            sample_weight: (m,) non-negative row weights (scikit-learn's meaning).
            l2: an L2 penalty on the ``Linear`` weights as scikit-learn's ``alpha``: l2/(2N)·
                sum ||W||² added to the loss, N the batch's rows (or weight sum).

        Returns ``(loss, grads)``, or ``(loss, grads, new_state)`` when ``state`` is passed;
        ``loss`` is 0-d and ``grads`` is shaped like ``params``.
        """
        check_loss(loss)
        like = self.check_params(params)
        _validate.check_no_autocast(like.device, "MLP.value_and_grad")
        x, y = self.check_data(params, x, y, loss=loss, like=like)
        weight = _validate.as_weights(sample_weight, x.shape[0], like)
        model_state = self.state_or_default(state, like)
        self.check_training_rows(x.shape[0], weight)
        key = self.check_key(key, x.device)
        l2 = check_l2(l2)
        with torch.no_grad():
            value, grads, new_state = value_and_grad(self, params, x, y, loss, model_state,
                                                     key=key, weight=weight, l2=l2)
        return (value, grads) if state is None else (value, grads, new_state)

    def evaluate(self, params: Params, x, y, loss: Loss = mse, *, state: State | None = None,
                 sample_weight=None) -> float:
        """The loss of the evaluation-mode predictions on (x, y), as a Python float; x as
        ``apply`` takes it (a SciPy sparse matrix too, densified a block of rows at a
        time)."""
        check_loss(loss)  # a float: "none" has no single value
        like = self.check_params(params)
        _validate.check_no_autocast(like.device, "MLP.evaluate")
        x, y = self.check_data(params, x, y, loss=loss, like=like, sparse=True)
        weight = _validate.as_weights(sample_weight, x.shape[0], like)
        prediction = (self.predict_rows(params, x, like, state) if _validate.is_sparse(x)
                      else self.unchecked_apply(params, x, like, state, train=False, key=None))
        with torch.no_grad():
            return loss(prediction, y, weight).item()

    def predict_proba(self, params: Params, x, *, loss: Loss | None = None,
                      state: State | None = None) -> Tensor:
        """Class probabilities, where the outputs are probabilities or ``loss`` says that they
        are a classifier's logits.

        The last primitive (past ``Dropout`` and ``Identity``) decides first: the outputs of
        a softmax are the probabilities, of a log-softmax their logs (exponentiated), of a
        sigmoid one probability per output. Otherwise the outputs are taken as logits only
        when ``loss`` is the classifier's training loss: a ``CrossEntropy``
        (``fnmlp.cross_entropy``) gives their softmax, a ``BinaryCrossEntropyWithLogits``
        their sigmoid; for any other network (a regression, a ``Linear`` head without
        ``loss``) this raises ``ValueError`` before any work.

        One sigmoid output is a binary classifier: the result is (m, 2), columns P(class 0)
        and P(class 1), as scikit-learn's ``predict_proba``; several sigmoid outputs are
        independent labels (multilabel): (m, outputs). A softmax gives (m, classes).

        Arguments:
            params, x, state: as ``apply`` (evaluation mode; x may be SciPy sparse).
            loss: the loss the classifier was trained with, when its outputs are logits.
        """
        kind, link = self.probability_head(loss)
        out = self.apply(params, x, state=state)
        probabilities = out if link is None else link(out)
        if kind == "sigmoid" and self.out_features == 1:
            return torch.cat([1 - probabilities, probabilities], dim=1)
        return probabilities

    def predict_classes(self, params: Params, x, *, loss: Loss | None = None,
                        state: State | None = None) -> Tensor:
        """The predicted classes, int64: for a softmax (or softmax logits) the most probable
        class of each row (m,); for one sigmoid output P(class 1) > 1/2, (m,); for several
        sigmoid outputs (multilabel) an (m, outputs) indicator of P > 1/2. Which outputs are
        probabilities or logits, and ``loss``: as ``predict_proba`` (a ``ValueError`` for a
        network whose outputs are neither).

        Arguments:
            params, x, state: as ``apply`` (evaluation mode; x may be SciPy sparse).
            loss: the loss the classifier was trained with, when its outputs are logits.
        """
        kind, _ = self.probability_head(loss)
        if kind == "softmax":  # the largest output is the most probable class
            return self.apply(params, x, state=state).argmax(dim=1)
        probabilities = self.predict_proba(params, x, loss=loss, state=state)
        positive = probabilities[:, 1] if self.out_features == 1 else probabilities
        return (positive > 0.5).long()

    def probability_head(self, loss: Loss | None = None) -> tuple[str, Callable | None]:
        """How the outputs become class probabilities (the rule of ``predict_proba``):
        ``(kind, link)``, ``kind`` "softmax" (one distribution over the outputs) or "sigmoid"
        (each output a probability), ``link`` the function of the outputs that gives them
        (None: the outputs are the probabilities).

        Arguments:
            loss: the classifier's training loss, or None; consulted only when the last
                primitive is not a softmax, log-softmax or sigmoid.

        Raises ``ValueError`` when neither the last primitive nor ``loss`` makes the outputs
        probabilities, ``TypeError`` when ``loss`` is not an fnmlp loss.
        """
        head = self._last_primitive()
        found = _PROBABILITY_HEADS.get(getattr(head, "name", ""))
        if found is not None:
            return found
        if loss is not None and not isinstance(loss, Loss):
            raise TypeError(f"loss must be an fnmlp loss such as fnmlp.cross_entropy, got "
                            f"{loss!r}")
        if isinstance(loss, CrossEntropy):
            return "softmax", _softmax
        if isinstance(loss, BinaryCrossEntropyWithLogits):
            return "sigmoid", torch.sigmoid
        what = f"the network's outputs are not probabilities: its last primitive is " \
               f"{type(head).__name__}"
        if loss is None:
            raise ValueError(f"{what}; pass loss=fnmlp.cross_entropy if they are logits of a "
                             "classifier trained with it (loss=fnmlp."
                             "BinaryCrossEntropyWithLogits() for a binary or multilabel one)")
        raise ValueError(f"{what}, and loss={loss!r} is not a classifier's: pass the loss it "
                         "was trained with, fnmlp.cross_entropy or "
                         "fnmlp.BinaryCrossEntropyWithLogits(), if they are logits")

    def _last_primitive(self) -> Primitive:
        """The last primitive past ``Dropout`` and ``Identity`` (the last one if all are)."""
        return next((layer for layer in reversed(self.layers)
                     if not isinstance(layer, (Dropout, Identity))), self.layers[-1])


def _softmax(logits: Tensor) -> Tensor:
    return torch.softmax(logits, dim=1)


# the heads whose outputs are probabilities: (kind, link) as ``MLP.probability_head`` gives
_PROBABILITY_HEADS = {"softmax": ("softmax", None), "log_softmax": ("softmax", torch.exp),
                      "sigmoid": ("sigmoid", None)}


# --- the two loops, without checks ----------------------------------------------------------


def forward(model: MLP, params: Params, x: Tensor, state: State, context: Context = EVAL
            ) -> tuple[Tensor, list, State]:
    """``(y, residuals, new_state)``: every primitive's forward in order."""
    residuals, new_state = [], []
    for layer, p, s in zip(model.layers, params, state):
        x, residual, s = layer.forward(p, x, s, context)
        residuals.append(residual)
        new_state.append(s)
    return x, residuals, tuple(new_state)


def backward(model: MLP, params: Params, residuals: list, dy: Tensor) -> Params:
    """Gradients of every primitive's params, from the output's cotangent ``dy``: every
    primitive's backward in reverse order (the first needs no input gradient)."""
    grads: list[Any] = [None] * len(params)
    for i in reversed(range(len(params))):
        # the cast: dx is None only where need_input_grad is false, the loop's last pass
        dy, grads[i] = cast("tuple[Tensor, Any]", model.layers[i].backward(
            params[i], residuals[i], dy, need_input_grad=i > 0))
    return tuple(grads)


def value_and_grad(model: MLP, params: Params, x: Tensor, y: Tensor, loss: Loss,
                   state: State, *, key: Tensor | None = None, weight: Tensor | None = None,
                   l2: float = 0.0, lane_order_sums: bool = True):
    """``(loss, grads, new_state)`` without checks: the forward loop, the loss, the reverse
    loop. ``weight``: (m,) row weights (0 for padding rows), None for all equal. ``l2``: the
    penalty of ``l2_penalty``. ``lane_order_sums``: ``Context.lane_order_sums`` (True:
    softmax's backward bit-identical to autograd eagerly; False: plain row sums, for a step
    traced to be compiled)."""
    context = Context(train=True, key=key, row_weight=weight, lane_order_sums=lane_order_sums)
    out, residuals, new_state = forward(model, params, x, state, context)
    value, loss_residual = loss.forward(out, y, weight)
    grads = backward(model, params, residuals, loss.backward(loss_residual))
    if l2:
        value, grads = l2_penalty(model, params, grads, value, l2, loss, x.shape[0], weight)
    return value, grads, new_state


def l2_penalty(model: MLP, params: Params, grads: Params, value: Tensor, l2: float, loss: Loss,
               rows: int, weight: Tensor | None) -> tuple[Tensor, Params]:
    """scikit-learn's ``alpha``: adds l2/(2N)·sum ||W||² over the penalized leaves (``Linear``
    weights, not biases) to the loss and l2/N·W to their gradients, N the batch's rows (its
    weight sum with row weights; 1 for a summed loss) — the penalty per unit of data."""
    scale: Tensor | float
    if loss.reduction == "sum":
        scale = l2
    else:
        scale = l2 / (weight.sum() if weight is not None else rows)
    updated: list[Any] = list(grads)
    total: Tensor | None = None
    for i, layer in enumerate(model.layers):
        for name in layer.penalized:
            w = getattr(params[i], name)
            gradient = getattr(updated[i], name)
            gradient = gradient.add(w, alpha=scale) if isinstance(scale, float) else \
                gradient + scale * w
            updated[i] = dataclasses.replace(updated[i], **{name: gradient})
            flat = w.reshape(-1)
            square = torch.dot(flat, flat)
            total = square if total is None else total + square
    if total is not None:
        value = value + (0.5 * scale) * total
    return value, tuple(updated)


# --- checks -----------------------------------------------------------------------------------


class _Template(NamedTuple):
    """What ``params`` and ``state`` must look like: their structure (``_tree.flatten``'s
    spec), one meta tensor per leaf (shape and dtype kind) and each leaf's name."""

    params: tuple
    state: tuple
    param_spec: object
    state_spec: object
    param_leaves: list
    state_leaves: list
    param_paths: list[str]
    state_paths: list[str]


@functools.lru_cache(maxsize=64)
def _templates(model: MLP) -> _Template:
    """Parameters and state of ``model`` on the meta device, with their structure."""
    generator = torch.Generator()
    param_list: list[Any] = []
    state_list: list[Any] = []
    for layer, n_in in zip(model.layers, model.widths):
        if getattr(layer, "initializer", "") is None:  # Linear's field (or a user's)
            layer = dataclasses.replace(cast(Any, layer), initializer="zeros")
        _, p = layer.init(generator, n_in, torch.float32, torch.device("cpu"))
        param_list.append(tree_map(lambda t: t.to("meta"), p))
        state_list.append(layer.init_state(n_in, torch.float32, torch.device("meta")))
    params, state = tuple(param_list), tuple(state_list)
    (param_leaves, param_spec), (state_leaves, state_spec) = flatten(params), flatten(state)
    return _Template(params, state, param_spec, state_spec, param_leaves, state_leaves,
                     _leaf_paths(params, "params"), _leaf_paths(state, "state"))


def _check_tree(tree, name: str, model: MLP, like: Tensor | None = None) -> Tensor:
    """Raise unless ``tree`` (``name``: "params" or "state") has the template's structure and
    shapes, every float leaf one dtype and device (``like``'s if given); return a leaf."""
    template = _templates(model)
    if not isinstance(tree, tuple) or len(tree) != len(model.layers):
        source = "model.init" if name == "params" else "model.init_state"
        raise TypeError(f"{name} must be a tuple of {len(model.layers)} entries, one per "
                        f"primitive (from {source}), got {type(tree).__name__}"
                        + (f" of length {len(tree)}" if isinstance(tree, (tuple, list)) else ""))
    expected_tree, expected_spec, expected_leaves, paths = (
        (template.params, template.param_spec, template.param_leaves, template.param_paths)
        if name == "params" else
        (template.state, template.state_spec, template.state_leaves, template.state_paths))
    leaves, spec = flatten(tree)
    if spec != expected_spec:
        for i, (entry, expected, layer) in enumerate(zip(tree, expected_tree, model.layers)):
            if flatten(entry)[1] != flatten(expected)[1]:
                raise TypeError(f"{name}[{i}] does not fit {layer}: expected "
                                f"{_describe(expected)}, got {_describe(entry)}")
    first = like
    if first is None:
        if not leaves:
            raise ValueError(f"{name} holds no tensors: the model has no parameters")
        first = leaves[0]
    for path, leaf, expected in zip(paths, leaves, expected_leaves):
        if leaf.shape != expected.shape:
            raise ValueError(f"{path} has shape {tuple(leaf.shape)} but the model needs "
                             f"{tuple(expected.shape)}")
        dtype = first.dtype if expected.is_floating_point() else expected.dtype
        if leaf.dtype != dtype or leaf.device != first.device:
            reference = "the parameters are" if like is not None else f"{paths[0]} is"
            raise ValueError(f"{path} is {leaf.dtype} on {leaf.device} but {reference} "
                             f"{first.dtype} on {first.device}; all must match")
    if not first.dtype.is_floating_point:
        raise TypeError(f"parameters must be floating point, got {first.dtype}")
    return first


def _leaf_paths(template, name: str) -> list[str]:
    paths = torch.utils._pytree.tree_flatten_with_path(template)[0]
    return [name + torch.utils._pytree.keystr(path) for path, _ in paths]


def _describe(entry) -> str:
    if isinstance(entry, tuple) and not entry:
        return "() (no tensors)"
    return type(entry).__name__


def check_l2(l2) -> float:
    """``l2`` as a float >= 0; raises on anything else."""
    if isinstance(l2, bool) or not isinstance(l2, (int, float)) or not math.isfinite(l2) \
            or l2 < 0:
        raise ValueError(f"l2 must be a finite number >= 0, got {l2!r}")
    return float(l2)


def _check_dtype(dtype) -> None:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")


def check_loss(loss, training: bool = True) -> None:
    if not isinstance(loss, Loss):
        raise TypeError(f"loss must be an fnmlp loss such as fnmlp.mse, got {loss!r}")
    if training and loss.reduction == "none":
        raise ValueError(f"{loss!r} gives per-row losses; training needs reduction='mean' or "
                         "'sum'")
