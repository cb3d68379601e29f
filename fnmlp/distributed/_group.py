"""The process group a data-parallel fit runs in: joining the one ``torchrun`` set up, the
collectives fnmlp uses (broadcast, all-reduce), each failing with a clear error within a bounded
time instead of torch's 30-minute default."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch import Tensor

from fnmlp._tree import through_flat_buckets
from fnmlp._errors import FnmlpError

DEFAULT_TIMEOUT = 60.0  # seconds a collective may wait for the other ranks


class DistributedError(FnmlpError, RuntimeError):
    """Another rank failed, died or stopped responding (or the group could not be joined)."""


_timeout = DEFAULT_TIMEOUT


def init(backend: str | None = None, *, timeout: float | None = None,
         device: torch.device | str = "cpu") -> None:
    """Join the process group ``torchrun`` described in the environment (``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), unless one is joined already.

    Arguments:
        backend: "gloo" or "nccl"; default: NCCL for CUDA parameters (with gloo beside it for
            CPU tensors), gloo on the CPU.
        timeout: seconds a collective waits for the other ranks before failing with
            ``DistributedError`` (default 60; torch's is 30 minutes). Given when the group is
            joined already, it only changes what the errors say.
        device: where the parameters live (chooses the default backend). On CUDA each rank's
            parameters must be on its own device, ``cuda:LOCAL_RANK``.
    """
    global _timeout
    if timeout is not None and not (isinstance(timeout, (int, float))
                                    and not isinstance(timeout, bool) and timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    device = torch.device(device)
    local = os.environ.get("LOCAL_RANK")
    if device.type == "cuda" and local is not None:
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index != int(local):
            raise DistributedError(f"rank with LOCAL_RANK={local} has its parameters on "
                                   f"cuda:{index}; put each rank's on cuda:LOCAL_RANK")
    if dist.is_initialized():
        if timeout is not None:
            _timeout = float(timeout)
        return
    _timeout = float(timeout) if timeout is not None else DEFAULT_TIMEOUT
    missing = [name for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
               if name not in os.environ]
    if missing:
        raise DistributedError(
            f"distributed=True needs a process group: run under torchrun "
            f"(torchrun --nproc_per_node=N script.py) or set {', '.join(missing)}")
    if backend is None:
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    elif backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=_timeout))
    except Exception as error:  # noqa: BLE001 (any failure to join is this error)
        raise DistributedError(f"could not join the process group ({backend}): {error}") \
            from error


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """The number of ranks (1 when not distributed)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce_sum(bucket: Tensor, what: str) -> Tensor:
    """``bucket`` summed over the ranks (in place on a fresh copy; one collective)."""
    bucket = bucket.clone()
    _collective(lambda: dist.all_reduce(bucket, op=dist.ReduceOp.SUM), what)
    return bucket


def broadcast(tensors: list[Tensor], what: str) -> list[Tensor]:
    """Rank 0's ``tensors`` on every rank, as one flat bucket per dtype (fresh tensors)."""
    return through_flat_buckets(
        tensors, lambda flat: _collective(lambda: dist.broadcast(flat, src=0), what))


def wait_for_all(what: str, timeout: float) -> None:
    """A barrier allowed ``timeout`` seconds (at least the collectives'): after compiling,
    which may take one rank much longer than another (a cold compiler cache)."""
    if not dist.is_initialized():
        return
    seconds = datetime.timedelta(seconds=max(timeout, _timeout))
    if dist.get_backend() == "gloo":
        _collective(lambda: dist.monitored_barrier(timeout=seconds, wait_all_ranks=True), what)
    else:
        _collective(dist.barrier, what)


def collective_call(run, what: str):
    """``run()``'s result; its failure (a collective inside it) as ``DistributedError``."""
    return _collective(run, what)


def _collective(run, what: str):
    try:
        return run()
    except Exception as error:  # noqa: BLE001 (gloo and NCCL raise various types)
        raise DistributedError(
            f"rank {rank()} of {world_size()}: {what} failed — another rank raised, died or "
            f"did not answer within {_timeout:g} s ({type(error).__name__}: {error})") from error


def check_same(fields: dict[str, float], what: str, *, sums: tuple[str, ...] = ()) -> None:
    """Raise ``ValueError`` naming the first of ``fields`` whose value differs between ranks;
    ``sums``: fields that are floating sums, compared to 1e-9 relative (a sum's last bits
    depend on the thread count that added it)."""
    if not dist.is_initialized():
        return
    values = torch.tensor([float(v) for v in fields.values()], dtype=torch.float64,
                          device=_small_tensor_device())
    both = all_reduce_max(torch.cat([values, -values]), f"comparing {what}").cpu()
    highest, lowest = both[:len(values)], -both[len(values):]
    for name, high, low in zip(fields, highest.tolist(), lowest.tolist()):
        slack = 1e-9 * max(abs(high), abs(low)) if name in sums else 0.0
        if high - low > slack:
            raise ValueError(f"the ranks differ in {what}: {name} is {low:g} on one rank and "
                             f"{high:g} on another; every rank must run the same fit")


def check_same_run(x: Tensor, y: Tensor, weight: Tensor | None, valid, *, epochs: int,
                   batch_size: int, shuffle: bool, resume: bool,
                   fingerprint: str | None = None) -> None:
    """Every rank of a data-parallel fit must have the same data and loop: compared by size,
    settings and checksums (sums of the values) before any work; a checkpointed fit's data
    fingerprint too (each rank hashes its own copy of the data: alike here, so every rank
    agrees whether a checkpoint holds a fit on this data)."""
    def checksum(values: Tensor | None) -> float:
        return 0.0 if values is None else float(values.double().sum())

    sums = {"the sum of x": checksum(x), "the sum of y": checksum(y),
            "the sum of sample_weight": checksum(weight),
            "the sum of the validation data": 0.0 if valid is None else
            checksum(valid[0]) + checksum(valid[1])}
    check_same({"rows": x.shape[0], "batch_size": batch_size, "epochs": epochs,
                "shuffle": shuffle, "resume": resume, "sample_weight given": weight is not None,
                "validation rows": -1 if valid is None else valid[0].shape[0],
                # 48 bits of the SHA-256: exact in the float64 the ranks compare
                "the data's fingerprint": -1 if fingerprint is None else int(fingerprint[:12], 16),
                **sums},
               "their data or fit settings", sums=tuple(sums))


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` holds on any rank (every rank gets the same answer)."""
    if not dist.is_initialized():
        return flag
    flags = torch.tensor([float(flag)], dtype=torch.float64, device=_small_tensor_device())
    return bool(all_reduce_max(flags, "sharing a stop request")[0] > 0)


def _small_tensor_device() -> torch.device:
    """Where this group can reduce small CPU-made tensors: the CPU, unless the group is NCCL
    alone (then the current CUDA device)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_max(values: Tensor, what: str) -> Tensor:
    values = values.clone()
    _collective(lambda: dist.all_reduce(values, op=dist.ReduceOp.MAX), what)
    return values


def start_alike(params, opt_state, generator: torch.Generator | None):
    """Rank 0's ``params``, ``opt_state`` (when given) and ``generator`` state on every rank, so
    that all ranks start the same run."""
    from fnmlp._tree import flatten, unflatten

    trees = (params, opt_state)
    leaves, spec = flatten(trees)
    params, opt_state = unflatten(broadcast(leaves, "broadcasting rank 0's parameters"), spec)
    if generator is not None and dist.is_initialized():
        state = generator.get_state().to(_small_tensor_device())
        (state,) = broadcast([state], "broadcasting rank 0's generator state")
        generator.set_state(state.cpu())
    return params, opt_state, generator
