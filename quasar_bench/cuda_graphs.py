"""CUDA graphs for the native runtime: one graph per (tokens per forward, attended span bucket).

The decode loop calls forward with 1 token (AR) or k+1 tokens (verify) at a growing position;
graphs need fixed shapes and addresses, so positions live in a device buffer and attention runs
over the cache prefix rounded up to `bucket` slots (masked past the current position). Inputs are
copied into static buffers, the graph is replayed, and the logits are copied out.
"""
from __future__ import annotations

import torch


class CUDAGraphs:
    def __init__(self, model, max_tokens: int, max_len: int, bucket: int = 256):
        self.model, self.max_tokens, self.bucket = model, max_tokens, bucket
        self.max_len = -(-max_len // bucket) * bucket
        dev = model.device
        self.ids = torch.zeros(max_tokens, dtype=torch.long, device=dev)
        self.start = torch.zeros((), dtype=torch.long, device=dev)
        self.offsets = torch.arange(max_tokens, device=dev)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def span(self, end: int) -> int:
        return min(-(-end // self.bucket) * self.bucket, self.max_len)

    def capture(self, t: int, span: int):
        m = self.model
        pos = lambda: self.start + self.offsets[:t]  # noqa: E731 (computed inside the graph)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):  # warm-up: autotuning, allocator, cuBLAS handles stay out of the graph
                m.static_forward(self.ids[:t], pos(), span)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph, pool=self.pool):
            out = m.static_forward(self.ids[:t], pos(), span)
        return graph, out

    def capture_all(self) -> None:
        """Capture every (tokens, span) graph up front (and let the Triton kernels autotune every
        row count), so no capture or tuning ever lands inside a timed decode step. The warm-up
        forwards write KV slots 0..t-1, which the next generation's prefill overwrites."""
        self.start.fill_(0)
        for t in range(1, self.max_tokens + 1):
            for span in range(self.bucket, self.max_len + 1, self.bucket):
                if (t, span) not in self.graphs:
                    self.graphs[(t, span)] = self.capture(t, span)
        torch.cuda.synchronize()

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, start: int) -> torch.Tensor:
        t = input_ids.shape[0]
        key = (t, self.span(start + t))
        # Inputs first: capture's warm-up forwards write the KV cache at these same positions with
        # these same tokens, so they leave exactly what the replay writes.
        self.ids[:t].copy_(input_ids, non_blocking=True)
        self.start.fill_(start)
        if key not in self.graphs:
            self.graphs[key] = self.capture(*key)
        graph, out = self.graphs[key]
        graph.replay()
        return out.clone()
