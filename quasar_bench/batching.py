"""Batch size B > 1: B sequences share one verify forward per step (decode.generate_batch).

The KV cache is static, [L, B, n_kv, S, D], and every sequence has its own filled length: a
verify forward feeds row b's last token and drafts at row b's own positions (the GEMMs see
M = B x tokens-per-row rows), and each sequence rolls back on its own. `seq(b)` is sequence b's
view of the cache with the single-sequence runtime interface (forward / prefill / rollback), which
prefill and the drafters use: drafters stay per-sequence objects, and a self-speculative drafter's
own forwards run on its sequence alone (eagerly, one sequence at a time: their draft time grows
with B, and rows record it).

On CUDA the batched verify forward replays a CUDA graph per (tokens per row, attended span bucket),
captured up front by `capture_all` (the decode loop's verify widths), or on first use otherwise.
Native runtime only: the generic transformers path has no static cache to batch.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager

import torch

from .errors import QuasarError

log = logging.getLogger(__name__)


class BatchRuntime:
    def __init__(self, model, size: int):
        if not getattr(model, "is_native", False):
            raise QuasarError(f"batch_size={size} needs the native runtime (llama/qwen2/qwen3/mistral); this model "
                              "runs on the generic transformers path: use batch_size=1")
        self.model, self.size, self.device = model, int(size), model.device
        self.k_cache = self.v_cache = None
        self.views = [SequenceView(self, b) for b in range(self.size)]
        self.graphs: BatchGraphs | None = None

    def reset(self, max_len: int) -> None:
        m, a = self.model, self.model.args
        if max_len > m.max_len:
            raise QuasarError(f"prompt + max_new_tokens = {max_len} positions exceeds the runtime's RoPE table "
                              f"({m.max_len}); lower max_new_tokens= or raise model.max_seq_len=")
        if self.graphs is not None:
            if max_len > self.graphs.max_len:
                raise QuasarError(f"{max_len} positions exceed the CUDA-graph cache ({self.graphs.max_len}); "
                                  "raise model.max_seq_len=")
            max_len = self.graphs.max_len  # graphs captured the cache's address: one full-size allocation
        shape = (m.num_layers, self.size, a.num_kv_heads, max_len, a.head_dim)
        if self.k_cache is None or self.k_cache.shape != shape:
            self.k_cache = torch.zeros(shape, dtype=m.dtype, device=self.device)
            self.v_cache = torch.zeros(shape, dtype=m.dtype, device=self.device)
        for v in self.views:
            v.cache_len = 0

    def seq(self, b: int) -> "SequenceView":
        return self.views[b]

    def forward(self, rows: list[list[int]], starts: list[int]) -> torch.Tensor:
        """Logits [B, T, V] of row b's tokens at positions starts[b].. (each view's length becomes
        starts[b] + T, as a single-sequence forward leaves it). Valid until the next forward."""
        t = len(rows[0])
        end = max(starts) + t
        if end > self.k_cache.shape[3]:
            raise RuntimeError(f"KV cache overflow: {end} > {self.k_cache.shape[3]}")
        if self.graphs is not None and t <= self.graphs.max_tokens:
            logits = self.graphs.run(rows, starts)
        else:
            logits = self.model.forward_batch(torch.tensor(rows, device=self.device),
                                              torch.tensor(starts, device=self.device), self.k_cache,
                                              self.v_cache, end)
        for v, s in zip(self.views, starts):
            v.cache_len = s + t
        return logits

    def enable_cuda_graphs(self, max_tokens: int, max_len: int, bucket: int = 256) -> None:
        self.graphs = BatchGraphs(self, max_tokens, max_len, bucket)
        self.k_cache = None

    def release(self) -> None:
        self.graphs = None
        self.k_cache = self.v_cache = None


class SequenceView:
    """Sequence b of a BatchRuntime behind the single-sequence runtime interface: its forwards
    run the native model on cache row b (eagerly); everything else reads through to the model."""

    def __init__(self, batch: BatchRuntime, b: int):
        self.batch, self.b, self.cache_len = batch, b, 0

    def __getattr__(self, name):  # num_layers, vocab_size, device, dtype, args, is_native, ...
        return getattr(self.batch.model, name)

    @contextmanager
    def bound(self):
        """The model with this sequence's cache row and length in place of its own (and no
        single-sequence CUDA graphs: they address the model's own cache)."""
        m = self.batch.model
        saved = m.k_cache, m.v_cache, m.cache_len, m.graphs
        m.k_cache, m.v_cache = self.batch.k_cache[:, self.b], self.batch.v_cache[:, self.b]
        m.cache_len, m.graphs = self.cache_len, None
        try:
            yield m
        finally:
            self.cache_len = m.cache_len
            m.k_cache, m.v_cache, m.cache_len, m.graphs = saved

    def forward(self, input_ids: torch.Tensor, layer_ids=None) -> torch.Tensor:
        with self.bound() as m:
            return m.forward(input_ids, layer_ids)

    def prefill(self, input_ids: torch.Tensor) -> None:
        with self.bound() as m:
            m.prefill(input_ids)

    def rollback(self, n: int) -> None:
        assert 0 <= n <= self.cache_len, (n, self.cache_len)
        self.cache_len = n

    def reset(self, max_len: int) -> None:
        raise QuasarError("a sequence of a batch is reset with its batch (BatchRuntime.reset)")


class BatchGraphs:
    """CUDA graphs of BatchRuntime's verify forward, one per (tokens per row, span bucket): inputs
    go through static buffers, the logits come out of the graph's own buffer."""

    def __init__(self, batch: BatchRuntime, max_tokens: int, max_len: int, bucket: int = 256):
        self.batch, self.max_tokens, self.bucket = batch, max_tokens, bucket
        self.max_len = -(-max_len // bucket) * bucket
        dev = batch.device
        self.ids = torch.zeros(batch.size, max_tokens, dtype=torch.long, device=dev)
        self.starts = torch.zeros(batch.size, dtype=torch.long, device=dev)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def span(self, end: int) -> int:
        return min(-(-end // self.bucket) * self.bucket, self.max_len)

    def capture(self, t: int, span: int):
        b = self.batch
        ids = self.ids[:, :t]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):  # warm-up: autotuning and allocations stay out of the graph
                b.model.forward_batch(ids, self.starts, b.k_cache, b.v_cache, span)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph, pool=self.pool):
            out = b.model.forward_batch(ids, self.starts, b.k_cache, b.v_cache, span)
        return graph, out

    def capture_all(self, widths) -> None:
        """Every (width, span) graph for the given tokens-per-row widths, before any timing (the
        warm-up forwards write cache slots 0..t-1, which the next generation's prefill overwrites)."""
        self.starts.zero_()
        for t in widths:
            for span in range(self.bucket, self.max_len + 1, self.bucket):
                if (t, span) not in self.graphs:
                    self.graphs[(t, span)] = self.capture(t, span)
        torch.cuda.synchronize()

    @torch.inference_mode()
    def run(self, rows: list[list[int]], starts: list[int]) -> torch.Tensor:
        t = len(rows[0])
        key = (t, self.span(max(starts) + t))
        self.ids[:, :t].copy_(torch.tensor(rows), non_blocking=True)
        self.starts.copy_(torch.tensor(starts), non_blocking=True)
        if key not in self.graphs:
            log.info("capturing the batch-%d CUDA graph for %s (tokens per row, span)", self.batch.size, key)
            self.graphs[key] = self.capture(*key)
        graph, out = self.graphs[key]
        graph.replay()
        return out
