"""fnmlp's own CUDA graphs: a compiled step captured once, replayed with one launch.

torch's ``mode="reduce-overhead"`` (cudagraph trees) copies every input into the graph's
static buffers and evaluates dynamo's guards on every call: on a small network that host work
was three quarters of a step. A ``CapturedStep`` instead keeps the step's carried leaves in
static buffers that the graph itself writes back at its end, so that a caller passing back
what it got last (known by identity) copies nothing in:

- static inputs: the leaves of each dtype as views of one flat buffer (a different carry is
  copied in with one multi-tensor copy per dtype), and one buffer per data item (copied in,
  unless it is the tensor copied last time, unchanged since: same object, same version);
- the capture: warm-up calls on a side stream, then the compiled function and one
  ``torch._foreach_copy_`` of its new leaves and its loss into the flat buffers;
- a replay returns fresh tensors: one clone per dtype's flat buffer, the leaves and the loss
  views of it, so that no tensor a caller holds is ever overwritten by a later replay.

The function may be one step or a chunk of N steps (``fnmlp.train._executor``); either way the
host does the same few launches per call.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class _Slots:
    """Where each tensor of a list lives: one flat buffer per dtype, each tensor a view."""

    def __init__(self, like: list[Tensor], device: torch.device):
        self.shapes = [t.shape for t in like]
        by_dtype: dict[torch.dtype, list[int]] = {}
        for index, tensor in enumerate(like):
            by_dtype.setdefault(tensor.dtype, []).append(index)
        self.groups = list(by_dtype.items())  # [(dtype, [indices])]
        self.buffers = [torch.zeros(sum(like[i].numel() for i in indices), dtype=dtype,
                                    device=device) for dtype, indices in self.groups]
        self.views = self.views_of(self.buffers)

    def views_of(self, buffers: list[Tensor]) -> list[Tensor]:
        """The tensors as views of ``buffers`` (laid out as this object's)."""
        views: list = [None] * len(self.shapes)
        for (_, indices), buffer in zip(self.groups, buffers):
            pieces = buffer.split([self.shapes[i].numel() for i in indices])
            for i, piece in zip(indices, pieces):
                views[i] = piece.view(self.shapes[i])
        return views

    def fresh(self) -> list[Tensor]:
        """Fresh copies of the tensors (one clone per dtype), as views."""
        return self.views_of([buffer.clone() for buffer in self.buffers])


class CapturedStep:
    """``function(*leaves, *data) -> (*leaves, loss)`` captured as one CUDA graph.

    Arguments:
        function: the compiled flat step (or chunk of steps), pure.
        args: example ``[*leaves, *data]`` (their shapes, dtypes and device are the graph's).
        count: how many of ``args`` are carried leaves.

    Calling it with ``args`` of the same shapes returns fresh ``[*leaves, loss]``.
    """

    def __init__(self, function, args: list[Tensor], count: int):
        device = args[0].device
        self.count = count
        leaves, data = args[:count], args[count:]
        with torch.no_grad(), torch.cuda.device(device):
            outputs = self._warm_up(function, args)
            self.slots = _Slots([*leaves, outputs[-1]], device)
            self.data = [t.clone() for t in data]
            self._returned: list = []
            self._given: list = [None] * len(data)  # (tensor, version) copied in last
            self._copy_in(leaves, data)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                outputs = function(*self.slots.views[:count], *self.data)
                torch._foreach_copy_(self.slots.views, list(outputs))
            del outputs

    @staticmethod
    def _warm_up(function, args: list[Tensor]):
        """Two calls on a side stream (kernels loaded, allocator warm), as capture needs."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                outputs = function(*args)
        torch.cuda.current_stream().wait_stream(stream)
        return outputs

    def _copy_in(self, leaves: Sequence[Tensor], data: Sequence[Tensor]) -> None:
        views = self.slots.views
        known = self._returned
        if not (len(leaves) == len(known) and all(a is b for a, b in zip(leaves, known))):
            torch._foreach_copy_(views[:self.count], list(leaves))
        for index, (static, given) in enumerate(zip(self.data, data)):
            last = self._given[index]
            if last is None or last[0] is not given or last[1] != given._version:
                static.copy_(given)
                self._given[index] = (given, given._version)

    def __call__(self, *args: Tensor) -> list[Tensor]:
        """Fresh ``[*leaves, loss]`` after replaying the graph on ``args``."""
        self._copy_in(args[:self.count], args[self.count:])
        self.graph.replay()
        outputs = self.slots.fresh()
        self._returned = outputs[:self.count]
        return outputs
