"""CUDA graphs for the native runtime: one graph per (tokens per forward, attended span bucket,
layers run).

The decode loop calls forward with 1 token (AR) or k+1 tokens (verify) at a growing position, and
self-speculative drafters call it on a subset of the layers; graphs need fixed shapes and
addresses, so positions live in a device buffer and attention runs over the cache prefix rounded
up to `bucket` slots (masked past the current position; with the fused attention kernels, which
read the filled length from the positions, one bucket spans the whole cache). Inputs are copied
into static buffers, the graph is replayed, and the logits are copied out. A shape not captured up
front (a drafter's layer subset) is captured on first use: the cell's untimed warm-up generation
makes that use, so captures stay out of timed steps.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


class CUDAGraphs:
    # A forward is captured as this many graphs (layer ranges), replayed back to back: launching a
    # graph of ~500 kernels costs ~0.3-0.5 ms of CPU before its first kernel runs (H100, CUDA 13;
    # results/gpu/profile_loop.md), and the decode loop waits for its host-side verdict every step,
    # so one big graph leaves the GPU idle that long. With chunks, the GPU runs chunk i while the CPU
    # launches chunk i + 1: only the first chunk's launch is exposed.
    chunks = 4

    def __init__(self, model, max_tokens: int, max_len: int, bucket: int = 256):
        self.model, self.max_tokens, self.bucket = model, max_tokens, bucket
        self.max_len = -(-max_len // bucket) * bucket
        dev = model.device
        self.ids = torch.zeros(max_tokens, dtype=torch.long, device=dev)
        self.start = torch.zeros((), dtype=torch.long, device=dev)
        self.offsets = torch.arange(max_tokens, device=dev)
        # key -> (graphs replayed in order, logits output, the tensors passed between them)
        self.graphs: dict[tuple, tuple[list[torch.cuda.CUDAGraph], torch.Tensor, dict]] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def span(self, end: int) -> int:
        return min(-(-end // self.bucket) * self.bucket, self.max_len)

    def capture(self, t: int, span: int, layers: tuple | None = None):
        m = self.model
        ids = self.ids[:t]
        order = list(range(m.num_layers)) if layers is None else list(layers)
        n = max(1, min(self.chunks, len(order)))
        parts = [order[i * len(order) // n:(i + 1) * len(order) // n] for i in range(n)]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):  # warm-up: autotuning, allocator, cuBLAS handles stay out of the graph
                m.static_forward(ids, self.start + self.offsets[:t], span, order)
        torch.cuda.current_stream().wait_stream(stream)
        graphs, state, out = [], None, None
        with torch.inference_mode():
            for i, part in enumerate(parts):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    if i == 0:  # positions computed inside the graph: no Python int may change between replays
                        state = m.static_begin(ids, self.start + self.offsets[:t], span)
                    m.static_layers(state, part)
                    if i == n - 1:
                        out = m.static_end(state)
                graphs.append(graph)
        return graphs, out, state  # `state` keeps the tensors chunk i + 1 reads alive

    def capture_all(self, widths=None) -> None:
        """Capture every (tokens, span) graph up front for the token counts `widths` (default 1 ..
        max_tokens), letting the Triton kernels autotune every row count, so no capture or tuning
        lands inside a timed decode step. The warm-up forwards write KV slots 0..t-1, which the
        next generation's prefill overwrites."""
        self.start.fill_(0)
        for t in sorted(set(widths or range(1, self.max_tokens + 1))):
            for span in range(self.bucket, self.max_len + 1, self.bucket):
                if (t, span, None) not in self.graphs:
                    self.graphs[(t, span, None)] = self.capture(t, span)
        torch.cuda.synchronize()

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, start: int, layer_ids=None) -> torch.Tensor:
        t = input_ids.shape[0]
        key = (t, self.span(start + t), None if layer_ids is None else tuple(layer_ids))
        # Inputs first: capture's warm-up forwards write the KV cache at these same positions with
        # these same tokens, so they leave exactly what the replay writes.
        self.ids[:t].copy_(input_ids, non_blocking=True)
        self.start.fill_(start)
        if key not in self.graphs:
            log.debug("capturing CUDA graphs for %s (tokens, span, layers)", key)
            self.graphs[key] = self.capture(*key)
        graphs, out, _ = self.graphs[key]
        for graph in graphs:
            graph.replay()
        return out.clone()
