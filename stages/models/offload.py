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
import copy
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


class BlockSwap:
    """Keep the quantized weights of some blocks in pinned host memory and copy each block's in
    just before it runs, in the forward and again in the recompute of backward; they are let go
    once the block is done. kohya's "block swap", for the nf4 base: a FLUX.1-dev single block is
    ~71 MiB in nf4, so swapping 8 of them frees ~0.6 GiB for ~1 GiB of copies per step.

    Only bitsandbytes ``Params4bit`` weights move (>99 % of a block's bytes), each with its own
    quant state: the device copy of the state is a new object, so what autograd saved for the
    backward (``ctx.state``, the weight view) keeps pointing at device tensors. Norm weights,
    biases and the trainable LoRA stay on the device. The arithmetic is unchanged: the same adapter
    comes out (tests/test_memory.py; on CPU the hooks run but move nothing)."""

    def __init__(self, blocks: list[nn.Module], device: torch.device):
        self.device = torch.device(device)
        self.handles = []
        self.swapped = 0
        pin = self.device.type == "cuda"
        for block in blocks:
            slots = []
            for prm in block.parameters():
                if prm.requires_grad or getattr(prm, "quant_state", None) is None:
                    continue
                host = prm.data.to("cpu")
                host_state = _state_to(prm.quant_state, torch.device("cpu"), pin)
                prm.data, prm.quant_state = (host.pin_memory() if pin else host), host_state
                slots.append((prm, prm.data, host_state))
            if slots:
                self.handles.append(block.register_forward_pre_hook(self._loader(slots)))
                self.handles.append(block.register_forward_hook(self._releaser(slots)))
                self.swapped += 1

    def _loader(self, slots):
        def hook(module, args):
            for prm, host, host_state in slots:
                prm.data = host.to(self.device, non_blocking=True)
                prm.quant_state = _state_to(host_state, self.device)
        return hook

    @staticmethod
    def _releaser(slots):
        def hook(module, args, output):
            for prm, host, host_state in slots:
                prm.data, prm.quant_state = host, host_state
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _state_to(state, device: torch.device, pin: bool = False):
    """A copy of a bitsandbytes QuantState (and its nested state) with its tensors on ``device``."""
    if state is None:
        return None
    new = copy.copy(state)
    for attr, value in vars(state).items():
        if isinstance(value, torch.Tensor):
            t = value.to(device, non_blocking=True)
            setattr(new, attr, t.pin_memory() if pin and device.type == "cpu" else t)
    if getattr(state, "state2", None) is not None:
        new.state2 = _state_to(state.state2, device, pin)
    return new
