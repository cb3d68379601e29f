"""fnmlp: pure-functional multilayer perceptrons with explicit backward rules, on PyTorch.

    model = fnmlp.MLP(6, [fnmlp.Dense(32, "tanh"), fnmlp.Dense(3)])
    params = model.init(torch.Generator().manual_seed(0), dtype=torch.float64)
    loss, grads = model.value_and_grad(params, x, y)
    result = fnmlp.fit(model, params, x, y, epochs=32, batch_size=333, optimizer=fnmlp.sgd(0.01))

Layers of the design, one subpackage each: ``fnmlp.nn`` (primitives, losses, the network),
``fnmlp.optim`` (optimizers, schedules), ``fnmlp.train`` (step, compilation, fit) and
``fnmlp.interop`` (the torch twin); ``fnmlp.testing`` checks a primitive or loss of one's own.
The common names are re-exported here.
"""

from fnmlp import (callbacks, distributed, ensemble, interop, metrics, nn, optim, testing,
                   train, workloads)
from fnmlp._entry import fit, train_step
from fnmlp._errors import FnmlpError
from fnmlp._tree import pytree_dataclass
from fnmlp.callbacks import Callback
from fnmlp.ensemble import Ensemble
from fnmlp.interop import CheckpointError, TorchTwin, from_torch, load, register, save, to_torch
from fnmlp.nn import (ELU, GELU, L1, MLP, MSE, BatchNorm, BinaryCrossEntropyWithLogits,
                      CrossEntropy, Dense, Dropout, Huber, Identity, LayerNorm, LeakyReLU, Linear,
                      LogSoftmax, PoissonNLL, Primitive, ReLU, Sigmoid, SiLU, SmoothL1, Softmax,
                      Softplus, Tanh, cross_entropy, dropout_key, mse)
from fnmlp.optim import adagrad, adam, adamw, clip_by_global_norm, rmsprop, schedules, sgd
from fnmlp.train import CompileVerificationError, NonFiniteLossError

# One name per concept. Kept as aliases: ``mse`` and ``cross_entropy``, the default instances
# of ``MSE()`` and ``CrossEntropy()`` that most code passes as ``loss=``. The rest lives in the
# subpackages: parameter types (``fnmlp.nn.LinearParams``), the other loss instances
# (``fnmlp.nn.l1``), result types (``fnmlp.train.FitResult``), ``fnmlp.interop.Checkpoint``.
__all__ = [
    # the network and its primitives
    "MLP", "Dense", "Primitive", "Linear", "LayerNorm", "BatchNorm", "Dropout", "dropout_key",
    "pytree_dataclass", "register",
    # activations (also selected by name)
    "Identity", "ReLU", "LeakyReLU", "ELU", "GELU", "SiLU", "Softplus", "Sigmoid", "Tanh",
    "Softmax", "LogSoftmax",
    # losses (classes; ``mse`` and ``cross_entropy``: the default instances)
    "MSE", "L1", "Huber", "SmoothL1", "PoissonNLL", "CrossEntropy",
    "BinaryCrossEntropyWithLogits", "mse", "cross_entropy",
    # optimizers and schedules
    "sgd", "adam", "adamw", "rmsprop", "adagrad", "clip_by_global_norm", "schedules",
    # training
    "fit", "train_step", "Ensemble", "Callback",
    # errors
    "FnmlpError", "NonFiniteLossError", "CompileVerificationError", "CheckpointError",
    # interop and checkpoints
    "to_torch", "from_torch", "TorchTwin", "save", "load",
    # subpackages
    "nn", "optim", "train", "interop", "ensemble", "distributed", "metrics", "workloads",
    "testing", "callbacks",
]
__version__ = "0.2.0"
