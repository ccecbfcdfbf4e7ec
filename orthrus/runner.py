"""One decoding iteration over static buffers, replayed as CUDA graphs on the GPU.

An iteration is two stages: `draft` (the diffusion pass, writing `drafts`) and `verify` (the AR pass,
acceptance and rollback, writing `outputs` and moving `anchor` to the next anchor). Every input and output
is a preallocated device tensor and every position is read from the cache's device-side length, so on
CUDA each stage is captured once and replayed with no host work and no host sync; the host reads
`outputs` once per iteration, through `readback`. On the CPU the same stages simply run eagerly.

Nothing an iteration needs comes from the host, so the next iteration can be enqueued before the host has
read this one's tokens: `readback` copies them to pinned host memory behind the iteration and returns a
handle whose `tokens()` waits only for that copy. The GPU then never idles while the host reads, checks
stop conditions and launches the next graphs.
"""

from __future__ import annotations

import torch

from .cache import KVCache
from .decode import IterationOutputs, diffusion_drafts, verify_and_accept
from .model import Qwen3
from .sampling import SamplingParams, seed_key


# Readbacks a caller may hold unread at once: the iteration being read and the one enqueued ahead of it.
READBACK_SLOTS = 2


class Readback:
    """One iteration's emitted tokens on their way to the host."""

    def __init__(self, host: torch.Tensor, done: "torch.cuda.Event | None"):
        self._host, self._done = host, done

    def tokens(self) -> list[int]:
        """The emitted tokens (waits until the iteration and its copy have finished)."""
        if self._done is not None:
            self._done.synchronize()
        count, *block = self._host.tolist()
        return block[:count]


class IterationRunner:
    def __init__(self, network: Qwen3, cache: KVCache, params: SamplingParams, drafts: int,
                 diffusion: bool, use_graphs: bool | None = None):
        """`drafts`: tokens proposed per iteration (0 for plain AR); `diffusion`: whether the diffusion
        view proposes them (otherwise the caller writes `self.drafts` before `verify`)."""
        device = network.device
        self.network, self.cache, self.params, self.diffusion = network, cache, params, diffusion
        self.anchor = torch.zeros(1, dtype=torch.int64, device=device)
        self.drafts = torch.zeros(drafts, dtype=torch.int64, device=device)
        self.outputs = IterationOutputs(drafts + 1, device)
        # The seed the stages sample with lives on the device, so use_seed switches it without a new capture.
        self.seed_key = torch.tensor([seed_key(params.seed)], dtype=torch.int64, device=device)
        self.use_graphs = device.type == "cuda" if use_graphs is None else use_graphs
        self._draft_graph = self._verify_graph = None
        # An iteration's outputs.emitted ([count, tokens...]) is copied to a ring of pinned buffers.
        self._asynchronous = device.type == "cuda"
        self._host = [torch.zeros(self.outputs.emitted.shape, dtype=torch.int64, pin_memory=self._asynchronous)
                      for _ in range(READBACK_SLOTS)]
        self._copied = [torch.cuda.Event() if self._asynchronous else None for _ in range(READBACK_SLOTS)]
        self._next_slot = 0
        if self.use_graphs:
            self._capture()

    def _draft_eager(self) -> None:
        self.drafts.copy_(diffusion_drafts(self.network, self.cache, self.anchor, self.params, self.seed_key))

    def _verify_eager(self) -> None:
        verify_and_accept(self.network, self.cache, self.anchor, self.drafts, self.params, self.outputs,
                          self.seed_key)

    def _capture(self) -> None:
        # Warm up on a side stream (lazy initialisation must not be captured), then capture each stage.
        # Capturing runs nothing, but warm-up does: it writes the cache at its current length and moves
        # the length, so both are saved and restored around it.
        length = self.cache.length.clone()
        anchor = self.anchor.clone()
        stream = torch.cuda.Stream(self.network.device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                if self.diffusion:
                    self._draft_eager()
                self._verify_eager()
                self.cache.length.copy_(length)
        torch.cuda.current_stream().wait_stream(stream)
        pool = torch.cuda.graph_pool_handle()
        if self.diffusion:
            self._draft_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._draft_graph, pool=pool):
                self._draft_eager()
        self._verify_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._verify_graph, pool=pool):
            self._verify_eager()
        self.cache.length.copy_(length)
        self.anchor.copy_(anchor)

    def draft(self) -> None:
        if self._draft_graph is not None:
            self._draft_graph.replay()
        else:
            self._draft_eager()

    def verify(self) -> None:
        if self._verify_graph is not None:
            self._verify_graph.replay()
        else:
            self._verify_eager()

    def use_seed(self, seed: int) -> None:
        """Sample with `seed` from the next stage on (params.seed is only the initial one)."""
        self.seed_key.fill_(seed_key(seed))

    def step(self) -> None:
        if self.diffusion:
            self.draft()
        self.verify()

    def readback(self) -> Readback:
        """Starts copying the last enqueued iteration's tokens to the host. At most READBACK_SLOTS readbacks
        may be held unread: a later one reuses the oldest one's buffer."""
        slot = self._next_slot
        self._next_slot = (slot + 1) % READBACK_SLOTS
        self._host[slot].copy_(self.outputs.emitted, non_blocking=self._asynchronous)
        if self._copied[slot] is not None:
            self._copied[slot].record()
        return Readback(self._host[slot], self._copied[slot])
