"""Batch size B > 1: B sequences share one verify forward per step (decode.generate_batch).

The KV cache is static, [L, B, n_kv, S, D], and every sequence has its own filled length: a
verify forward feeds row b's last token and drafts at row b's own positions (the GEMMs see
M = B x tokens-per-row rows), and each sequence rolls back on its own. `seq(b)` is sequence b's
view of the cache with the single-sequence runtime interface (forward / prefill / rollback), which
prefill and the drafters use: drafters stay per-sequence objects, and a self-speculative drafter's
own forwards run on its sequence alone (eagerly, one sequence at a time: their draft time grows
with B, and rows record it).

Packed forwards (`packed=True`, config `batch_packed`): the loop says how many of each row's tokens
are real (its last token and drafts; 0 for a finished or absent sequence), and the embeddings,
norms, linears and MLP run on those tokens only, padded up to a multiple of `pack_bucket` rows (so
CUDA graphs exist for few shapes), as serving engines pack ragged batches; attention and the LM
head keep the [B, T] grid. Unpacked, every row is as wide as the batch's widest and the linears pay
for the padding.

On CUDA the batched verify forward replays a CUDA graph per (tokens per row, attended span bucket,
GEMM rows), captured up front by `capture_all` (the decode loop's verify widths), or on first use
otherwise; every graph writes its logits into one shared buffer. Native runtime only: the generic
transformers path has no static cache to batch.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager

import torch

from .errors import QuasarError

log = logging.getLogger(__name__)


class BatchRuntime:
    def __init__(self, model, size: int, packed: bool = False, pack_bucket: int = 32):
        if not getattr(model, "is_native", False):
            raise QuasarError(f"batch_size={size} needs the native runtime (llama/qwen2/qwen3/mistral); this model "
                              "runs on the generic transformers path: use batch_size=1")
        if pack_bucket < 1:
            raise QuasarError(f"pack_bucket={pack_bucket} is impossible: it must be >= 1")
        self.model, self.size, self.device = model, int(size), model.device
        self.packed, self.pack_bucket = bool(packed), int(pack_bucket)
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

    def gemm_rows(self, lengths: list[int] | None, t: int) -> int:
        """Rows the linears of a forward of width t see: B * t unpacked; packed, the real tokens
        (sum of lengths) rounded up to a multiple of pack_bucket, at most B * t."""
        if not self.packed or lengths is None:
            return self.size * t
        return self.bucketed(sum(lengths), t)

    def bucketed(self, real: int, t: int) -> int:
        return min(-(-max(real, 1) // self.pack_bucket) * self.pack_bucket, self.size * t)

    def row_counts(self, t: int) -> list[int]:
        """Every GEMM row count a forward of width t can have (a CUDA graph each)."""
        if not self.packed:
            return [self.size * t]
        return sorted({self.bucketed(m, t) for m in range(1, self.size * t + 1)})

    def pack_index(self, lengths: list[int], t: int) -> list[int] | None:
        """The flat slots b * t + j a packed forward runs its linears on: every row's first
        lengths[b] slots, then distinct padding slots up to gemm_rows (None: all of them)."""
        n = self.gemm_rows(lengths, t)
        if n == self.size * t:
            return None
        real = [b * t + j for b, m in enumerate(lengths) for j in range(m)]
        pad = [b * t + j for b, m in enumerate(lengths) for j in range(m, t)]
        return real + pad[: n - len(real)]

    def forward(self, rows: list[list[int]], starts: list[int], lengths: list[int] | None = None) -> torch.Tensor:
        """Logits [B, T, V] of row b's tokens at positions starts[b].. (each view's length becomes
        starts[b] + T, as a single-sequence forward leaves it). `lengths[b]`: how many of row b's
        tokens are real (the rest padding); a packed runtime skips padding in its linears (the
        skipped slots' logits are zero). Valid until the next forward."""
        t = len(rows[0])
        end = max(starts) + t
        if end > self.k_cache.shape[3]:
            raise RuntimeError(f"KV cache overflow: {end} > {self.k_cache.shape[3]}")
        if lengths is not None and (len(lengths) != self.size or not all(0 <= m <= t for m in lengths)):
            raise ValueError(f"lengths {lengths}: one per row, each 0..{t}")
        index = self.pack_index(lengths, t) if self.packed and lengths is not None else None
        if self.graphs is not None and t <= self.graphs.max_tokens:
            logits = self.graphs.run(rows, starts, index)
        else:
            logits = self.model.forward_batch(torch.tensor(rows, device=self.device),
                                              torch.tensor(starts, device=self.device), self.k_cache,
                                              self.v_cache, end,
                                              None if index is None else torch.tensor(index, device=self.device))
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
    """CUDA graphs of BatchRuntime's verify forward, one per (tokens per row, span bucket, GEMM
    rows): inputs go through static buffers, the logits come out in one buffer every graph writes
    (only one forward's logits are live at a time)."""

    def __init__(self, batch: BatchRuntime, max_tokens: int, max_len: int, bucket: int = 256):
        self.batch, self.max_tokens, self.bucket = batch, max_tokens, bucket
        self.max_len = -(-max_len // bucket) * bucket
        dev = batch.device
        self.ids = torch.zeros(batch.size, max_tokens, dtype=torch.long, device=dev)
        self.starts = torch.zeros(batch.size, dtype=torch.long, device=dev)
        self.index = torch.arange(batch.size * max_tokens, dtype=torch.long, device=dev)
        self.logits = torch.empty(batch.size, max_tokens, batch.model.vocab_size, dtype=torch.float32, device=dev)
        self.graphs: dict[tuple[int, int, int], torch.cuda.CUDAGraph] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def span(self, end: int) -> int:
        return min(-(-end // self.bucket) * self.bucket, self.max_len)

    def capture(self, t: int, span: int, n: int):
        b = self.batch
        args = (self.ids[:, :t], self.starts, b.k_cache, b.v_cache, span,
                None if n == b.size * t else self.index[:n], self.logits[:, :t])
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):  # warm-up: autotuning and allocations stay out of the graph
                b.model.forward_batch(*args)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph, pool=self.pool):
            b.model.forward_batch(*args)
        return graph

    def capture_all(self, widths) -> None:
        """Every (width, span, GEMM rows) graph for the given tokens-per-row widths, before any
        timing (the warm-up forwards write cache slots 0..t-1, which the next generation's prefill
        overwrites; a packed capture's index is the identity: distinct slots)."""
        self.starts.zero_()
        self.index.copy_(torch.arange(self.index.numel(), device=self.index.device))
        for t in widths:
            for n in self.batch.row_counts(t):
                for span in range(self.bucket, self.max_len + 1, self.bucket):
                    if (t, span, n) not in self.graphs:
                        self.graphs[(t, span, n)] = self.capture(t, span, n)
        torch.cuda.synchronize()

    @torch.inference_mode()
    def run(self, rows: list[list[int]], starts: list[int], index: list[int] | None = None) -> torch.Tensor:
        t = len(rows[0])
        n = self.batch.size * t if index is None else len(index)
        key = (t, self.span(max(starts) + t), n)
        self.ids[:, :t].copy_(torch.tensor(rows), non_blocking=True)
        self.starts.copy_(torch.tensor(starts), non_blocking=True)
        if index is not None:
            self.index[:n].copy_(torch.tensor(index), non_blocking=True)
        if key not in self.graphs:
            log.info("capturing the batch-%d CUDA graph for %s (tokens per row, span, GEMM rows)", self.batch.size, key)
            self.graphs[key] = self.capture(*key)
        self.graphs[key].replay()
        return self.logits[:, :t]
