"""The interop layer of the design: fnmlp ⇄ ``torch`` (modules, losses, optimizers and
schedules), through one two-way registry, checkpoints on disk (torch or safetensors files whose
weights plain torch reads, under the twin's ``state_dict`` names), and ``register``, which makes
a class of one's own savable and twinnable."""

from fnmlp.interop._checkpoint import Checkpoint, CheckpointError, check_writable, load, save
from fnmlp.interop._registry import (SharedMaskDropout, TorchOptimizer, loss_from_torch,
                                     loss_to_torch, module_for, optimizer_from_torch,
                                     optimizer_to_torch, register, supported_modules)
from fnmlp.interop._spec import decode_spec, decode_tree, encode_spec, encode_tree
from fnmlp.interop._torch import TorchTwin, from_torch, set_dropout_key, to_torch

__all__ = ["save", "load", "Checkpoint", "CheckpointError", "to_torch", "from_torch",
           "TorchTwin", "SharedMaskDropout", "set_dropout_key", "loss_to_torch",
           "loss_from_torch", "optimizer_to_torch", "optimizer_from_torch", "TorchOptimizer",
           "register", "supported_modules", "module_for", "encode_spec", "decode_spec",
           "encode_tree", "decode_tree", "check_writable"]
