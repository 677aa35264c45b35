"""Activation offload for training on small cards: saved activations wait in pinned host memory.

With gradient checkpointing the tensors autograd keeps between forward and backward are mostly
the inputs of each checkpointed block (57 blocks x ~28 MiB at 1024² for FLUX.1-dev: about 3 GiB
with the rest). :func:`activations` moves every such tensor of at least ``min_bytes`` to pinned
host memory as it is saved, on a side CUDA stream so the copy overlaps the forward, and brings it
back when backward needs it. Parameters are never moved (they are on the device anyway), and small
tensors shared by all blocks (rotary embeddings, the timestep embedding) stay where they are.
``torch.autograd.graph.save_on_cpu`` does the same with synchronous copies; measured on
FLUX.1-dev at 1024² nf4 it cost +17 % per step (ANCHORS.md), the side stream wins part of it back
(reports/bench/real_path.md).

On the CPU the same hooks copy the tensor (there is no other memory to move it to), so tests can
prove that training with offload gives the same adapter as without it.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


class Offloader:
    def __init__(self, min_bytes: int = 1 << 20):
        self.min_bytes = min_bytes
        self.stream = None
        self.packed = 0  # how many tensors went to host memory (for tests and logs)

    def _big(self, t: torch.Tensor) -> bool:
        return not isinstance(t, nn.Parameter) and t.numel() * t.element_size() >= self.min_bytes

    def pack(self, t: torch.Tensor):
        if not self._big(t):
            return t
        self.packed += 1
        if not t.is_cuda:
            return (t.device, t.clone())
        if self.stream is None:
            self.stream = torch.cuda.Stream(t.device)
        self.stream.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(self.stream):
            host = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=True)
            host.copy_(t, non_blocking=True)
            t.record_stream(self.stream)  # the device memory is reused only once the copy is done
            done = torch.cuda.Event()
            done.record(self.stream)
        return (t.device, host, done)

    def unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        if len(packed) == 2:
            return packed[1]
        device, host, done = packed
        torch.cuda.current_stream(device).wait_event(done)
        return host.to(device, non_blocking=True)


@contextlib.contextmanager
def activations(offloader: Offloader) -> Iterator[Offloader]:
    """Offload the tensors autograd saves inside this block (wrap the forward pass only)."""
    with torch.autograd.graph.saved_tensors_hooks(offloader.pack, offloader.unpack):
        yield offloader

