"""fnmlp: pure-functional multilayer perceptrons with explicit backward rules, on PyTorch.

Public API::

    model = fnmlp.MLP(6, [fnmlp.Dense(32, "tanh"), fnmlp.Dense(3)])
    params = model.init(torch.Generator().manual_seed(0), dtype=torch.float64)
    loss, grads = model.value_and_grad(params, x, y)
    result = fnmlp.fit(model, params, x, y, epochs=32, batch_size=333, optimizer=fnmlp.sgd(0.01))
"""

from fnmlp import metrics, schedules
from fnmlp._activations import (ELU, GELU, Activation, Identity, LeakyReLU, LogSoftmax, ReLU,
                                Sigmoid, SiLU, Softmax, Softplus, Tanh)
from fnmlp._dense import DenseParams, dense_backward, dense_forward
from fnmlp._dropout import make_key as dropout_key
from fnmlp._fit import FitResult, History, NonFiniteLossError, fit
from fnmlp._losses import (L1, MSE, BinaryCrossEntropyWithLogits, CrossEntropy, Huber, Loss,
                           binary_cross_entropy_with_logits, cross_entropy, huber, l1, mse)
from fnmlp._model import MLP, Dense
from fnmlp._norm import LayerNormParams
from fnmlp._optim import (SGD, Adagrad, AdagradState, Adam, AdamState, ClipByGlobalNorm,
                          Optimizer, RMSprop, RMSpropState, SGDState, adagrad, adam, adamw,
                          clip_by_global_norm, rmsprop, sgd)
from fnmlp._step import CompileVerificationError, TrainStep, train_step
from fnmlp._tree import pytree_dataclass
from fnmlp._twin import SharedMaskDropout, TorchTwin, from_torch, set_dropout_key, to_torch

__all__ = [
    # the network
    "MLP", "Dense", "DenseParams", "LayerNormParams", "dense_forward", "dense_backward",
    "dropout_key", "pytree_dataclass",
    # activations
    "Activation", "Identity", "ReLU", "LeakyReLU", "ELU", "GELU", "SiLU", "Softplus", "Sigmoid",
    "Tanh", "Softmax", "LogSoftmax",
    # losses
    "Loss", "MSE", "mse", "L1", "l1", "Huber", "huber", "CrossEntropy", "cross_entropy",
    "BinaryCrossEntropyWithLogits", "binary_cross_entropy_with_logits",
    # optimizers and schedules
    "Optimizer", "SGD", "SGDState", "sgd", "Adam", "AdamState", "adam", "adamw", "RMSprop",
    "RMSpropState", "rmsprop", "Adagrad", "AdagradState", "adagrad", "ClipByGlobalNorm",
    "clip_by_global_norm", "schedules",
    # training
    "train_step", "TrainStep", "CompileVerificationError", "fit", "FitResult", "History",
    "NonFiniteLossError",
    # interop and metrics
    "to_torch", "from_torch", "TorchTwin", "SharedMaskDropout", "set_dropout_key", "metrics",
]
__version__ = "0.1.0"
