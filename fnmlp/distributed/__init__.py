"""Data-parallel training over ``torch.distributed``: ``fnmlp.fit(..., distributed=True)`` under
``torchrun --nproc_per_node=N``.

    torchrun --nproc_per_node=2 examples/data_parallel.py

``init`` joins the process group torchrun describes (gloo on the CPU, NCCL on CUDA, or the
``backend`` given) with a collective timeout of ``timeout`` seconds; ``DataParallel`` is the
strategy ``fit`` runs with (``DistributedStep`` its step: each rank's shard of the global batch,
one all-reduce of a flat gradient bucket, the same update everywhere); ``DistributedError`` is
what every surviving rank raises when another one fails, dies or hangs.
"""

from fnmlp.distributed._group import (DEFAULT_TIMEOUT, DistributedError, init, rank, start_alike,
                                      world_size)
from fnmlp.distributed._step import DataParallel, DistributedStep

__all__ = ["init", "rank", "world_size", "start_alike", "DataParallel", "DistributedStep",
           "DistributedError", "DEFAULT_TIMEOUT"]
