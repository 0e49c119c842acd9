"""Model runtimes: a lean native Llama/Qwen2/Qwen3/Mistral implementation with a static KV cache,
and a generic transformers-backed one for every other causal LM (generic_runtime.HFRuntime).

Both expose the same small interface the decode loop and the drafters use:

    runtime.forward(input_ids [T], layer_ids=None) -> fp32 logits [T, V]
        appends T positions to the KV cache, starting at runtime.cache_len
    runtime.forward_fp32_head(input_ids [T])   forward(), the final norm and LM head in fp32
        (the fidelity pass)
    runtime.prefill(input_ids [T])   the same, without the logits (a prompt's are never read:
        the LM head over every prompt position is ~20 % of SmolLM2's prefill)
    runtime.rollback(n)      keep only the first n cached positions (rejected drafts vanish)
    runtime.reset(max_len)   empty cache able to hold max_len positions
    runtime.num_layers, runtime.vocab_size, runtime.device, runtime.dtype

Rollback on the static cache is free: positions past cache_len are simply overwritten by the next
forward. That is also why a forward over a subset of layers (layer-skip / early-exit drafting) is
safe: the verify forward that follows rewrites every layer's entries for the drafted positions.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import QuasarError
from .generic_runtime import HFRuntime  # noqa: F401 (the generic path, re-exported beside the native one)

NATIVE_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3"}


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    qk_norm: bool = False  # Qwen3 normalises q and k per head before RoPE
    attention_bias: bool = False  # Qwen2 has biases on q/k/v
    model_type: str = "llama"

    @classmethod
    def from_hf_config(cls, c) -> "ModelArgs":
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return cls(
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            num_layers=c.num_hidden_layers,
            num_heads=c.num_attention_heads,
            num_kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
            head_dim=head_dim,
            rms_norm_eps=c.rms_norm_eps,
            tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
            qk_norm=c.model_type == "qwen3",
            attention_bias=bool(getattr(c, "attention_bias", c.model_type == "qwen2")),
            model_type=c.model_type,
        )


def rms_norm(x, weight, eps: float):
    # as transformers: normalise in fp32, cast back, then scale
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope(x, cos, sin):
    """x [T, heads, D] rotated by the per-position cos/sin [T, D]."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def add_rms_norm(x, delta, weight, eps: float):
    """(x + delta, rms_norm(x + delta)): the residual add and the next norm, one pass."""
    x = x + delta
    return x, rms_norm(x, weight, eps)


def silu_mul(gate, up):
    return F.silu(gate) * up


class Elementwise:
    """The element-wise work between the GEMMs (norms, RoPE, SiLU * mul, residual adds): eager by
    default; `compile_elementwise(True)` swaps in torch.compile'd versions (dynamic shapes: one
    compilation serves every token count), which fuse each into one kernel instead of several: on
    a GPU these small kernels, not the GEMMs, are much of a decode step's time."""
    rms_norm, rope, add_rms_norm, silu_mul = staticmethod(rms_norm), staticmethod(rope), \
        staticmethod(add_rms_norm), staticmethod(silu_mul)


_EAGER = {name: getattr(Elementwise, name) for name in ("rms_norm", "rope", "add_rms_norm", "silu_mul")}


def compile_elementwise(enable: bool) -> None:
    for name, fn in _EAGER.items():
        setattr(Elementwise, name, staticmethod(torch.compile(fn, dynamic=True, fullgraph=True) if enable else fn))


class FusedAttention:
    """Hand-written Triton kernels for the attention of decode and verify forwards (T <= 16 tokens)
    on CUDA: the q/k/v split, q/k norms, RoPE and KV-cache writes in one kernel
    (quasar_kernels/rope_cache.py), and attention that reads only the filled cache, its length taken from
    the device-side positions (quasar_kernels/decode_attention.py), so one CUDA graph per token count serves
    every position. Off by default; `fused_attention(True)` turns it on (the harness: on CUDA).
    Prefill and CPU forwards keep the unfused path, the reference these kernels are tested against."""

    enabled = False
    max_tokens = 16
    devices = ("cuda",)  # tests add "cpu" to run the kernels through Triton's interpreter


def fused_attention(enable: bool) -> None:
    FusedAttention.enabled = bool(enable)


class Linear(nn.Linear):
    """nn.Linear whose CPU fp32 product of 3+ rows (verify steps, prefill) runs on a weight packed
    once for oneDNN (quasar_kernels.reference.linear) instead of MKL repacking it every call."""

    def forward(self, x):
        from quasar_kernels.reference import linear

        return linear(x, self.weight, self.bias)


def linear_fp32(mod, h: torch.Tensor) -> torch.Tensor:
    """mod(h) computed in fp32: a float linear's weight cast to fp32, a quantized linear (quant.py,
    which names its `op`) through the reference backend (its dequantized weight in an fp32 matmul;
    W8A8 still quantizes h per token, as it does when served)."""
    if hasattr(mod, "op"):
        from .backends import get_backend

        return getattr(get_backend("reference"), mod.op)(mod, h.float()).float()
    return F.linear(h.float(), mod.weight.float(), None if mod.bias is None else mod.bias.float())


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return Elementwise.rms_norm(x, self.weight, self.eps)


def causal_mask(query_pos: torch.Tensor, n_keys: int, dtype=torch.float32) -> torch.Tensor:
    """[T, n_keys] additive mask in `dtype`: the query at absolute position p sees keys 0..p. Made
    once a forward; a boolean mask would be converted to this by attention in every layer."""
    seen = torch.arange(n_keys, device=query_pos.device)[None, :] <= query_pos[:, None]
    return torch.zeros(seen.shape, dtype=dtype, device=seen.device).masked_fill_(~seen, float("-inf"))


@dataclass
class BatchPositions:
    """Where a batched forward's tokens sit (Transformer.forward_batch): `pos` [B, T] row b's
    positions in its own cache row; `index` [N] for a packed forward, the flat slots b * T + j whose
    tokens the linears run on (the rest of the [B, T] grid is padding they skip), None when they run
    on all B * T."""
    pos: torch.Tensor
    index: torch.Tensor | None = None


class Attention(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.a = a
        self.q_proj = Linear(a.hidden_size, a.num_heads * a.head_dim, bias=a.attention_bias)
        self.k_proj = Linear(a.hidden_size, a.num_kv_heads * a.head_dim, bias=a.attention_bias)
        self.v_proj = Linear(a.hidden_size, a.num_kv_heads * a.head_dim, bias=a.attention_bias)
        self.o_proj = Linear(a.num_heads * a.head_dim, a.hidden_size, bias=False)
        if a.qk_norm:
            self.q_norm = RMSNorm(a.head_dim, a.rms_norm_eps)
            self.k_norm = RMSNorm(a.head_dim, a.rms_norm_eps)

    def forward(self, x, cos, sin, kv, start, mask, span: int = 0):
        """x [T, H]; cos/sin [T, D]; kv = (k_cache, v_cache) [n_kv, S, D] or None (no cache).
        `start` is an int (eager), or a tensor of positions [T] with `span` keys attended (the
        static-shape path that CUDA graphs capture: no Python int may change between replays)."""
        a, t = self.a, x.shape[0]
        if isinstance(start, BatchPositions):
            return self.forward_batch(x, cos, sin, kv, start, mask, span)
        if mask is None:  # the caller chose the fused kernels (Transformer.uses_fused_attention)
            from quasar_kernels.decode_attention import decode_attention
            from quasar_kernels.rope_cache import qkv_rope_cache

            pos = start if isinstance(start, torch.Tensor) else torch.arange(start, start + t, device=x.device)
            norms = (self.q_norm.weight, self.k_norm.weight) if a.qk_norm else (None, None)
            q = qkv_rope_cache(self.qkv_proj(x), *norms, a.rms_norm_eps, cos, sin, *kv, pos)
            return self.o_proj(decode_attention(q, *kv, pos))
        q, k, v = self.project_qkv(x, cos, sin)
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [heads, T, D]
        if isinstance(start, torch.Tensor):
            k_cache, v_cache = kv
            k_cache.index_copy_(1, start, k)
            v_cache.index_copy_(1, start, v)
            k, v = k_cache[:, :span], v_cache[:, :span]
        elif kv is not None:
            k_cache, v_cache = kv
            k_cache[:, start : start + t] = k
            v_cache[:, start : start + t] = v
            k, v = k_cache[:, : start + t], v_cache[:, : start + t]
        out = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, enable_gqa=True)
        return self.o_proj(out[0].transpose(0, 1).reshape(t, -1))

    def project_qkv(self, x, cos, sin):
        """q, k, v of the rows x [N, H] as [N, heads, D]: q and k normed (Qwen3's qk_norm) and rotated."""
        a, n = self.a, x.shape[0]
        if hasattr(self, "qkv_proj"):  # fused (quant.fuse_projections): one GEMM, split after
            q, k, v = self.qkv_proj(x).split(self.split_sizes, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(n, a.num_heads, a.head_dim)
        k = k.view(n, a.num_kv_heads, a.head_dim)
        v = v.reshape(n, a.num_kv_heads, a.head_dim)
        if a.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return Elementwise.rope(q, cos, sin), Elementwise.rope(k, cos, sin), v

    def forward_batch(self, x, cos, sin, kv, where: BatchPositions, mask, span: int):
        """B sequences at once (Transformer.forward_batch): x [N, H] (the GEMMs see M = N rows: B * T,
        or the packed slots where.index), where.pos [B, T] each row's own positions, kv = caches
        [B, n_kv, S, D], mask [B, 1, T, span]. Attention runs on the [B, T] grid; a packed forward
        scatters q / k / v into it (padding slots zero: they sit after every real position of their
        row, so the causal mask hides them from real queries, and their cache writes land past the
        row's kept prefix) and gathers the real slots back before o_proj."""
        a, (b, t), n, index = self.a, where.pos.shape, x.shape[0], where.index
        q, k, v = self.project_qkv(x, cos, sin)
        if index is not None:
            q, k, v = (y.new_zeros(b * t, *y.shape[1:]).index_copy_(0, index, y) for y in (q, k, v))
        k_cache, v_cache = kv
        rows = torch.arange(b, device=x.device)[:, None].expand(b, t)
        # advanced indices around a slice: the indexed view is [B, T, n_kv, D]
        k_cache[rows, :, where.pos] = k.view(b, t, a.num_kv_heads, a.head_dim)
        v_cache[rows, :, where.pos] = v.view(b, t, a.num_kv_heads, a.head_dim)
        out = F.scaled_dot_product_attention(q.view(b, t, a.num_heads, a.head_dim).transpose(1, 2),
                                             k_cache[:, :, :span], v_cache[:, :, :span], attn_mask=mask,
                                             enable_gqa=True)
        out = out.transpose(1, 2).reshape(b * t, -1)
        return self.o_proj(out if index is None else out.index_select(0, index))


class MLP(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.gate_proj = Linear(a.hidden_size, a.intermediate_size, bias=False)
        self.up_proj = Linear(a.hidden_size, a.intermediate_size, bias=False)
        self.down_proj = Linear(a.intermediate_size, a.hidden_size, bias=False)

    def forward(self, x):
        if hasattr(self, "gate_up_proj"):  # fused (quant.fuse_projections)
            gate, up = self.gate_up_proj(x).split(self.split_sizes, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(Elementwise.silu_mul(gate, up))


class Block(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.self_attn = Attention(a)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.mlp = MLP(a)

    def forward(self, x, cos, sin, kv, start, mask, span=0):
        x, delta = self.forward_pending(x, None, cos, sin, kv, start, mask, span)
        return x + delta

    def forward_pending(self, x, delta, cos, sin, kv, start, mask, span=0):
        """(residual stream, this block's MLP output not yet added): the add is left to the next
        norm (add_rms_norm), one kernel instead of two. `delta` is the previous block's pending
        output (None for the first block)."""
        norm = self.input_layernorm
        if delta is None:
            h = norm(x)
        else:
            x, h = Elementwise.add_rms_norm(x, delta, norm.weight, norm.eps)
        attn = self.self_attn(h, cos, sin, kv, start, mask, span)
        norm = self.post_attention_layernorm
        x, h = Elementwise.add_rms_norm(x, attn, norm.weight, norm.eps)
        return x, self.mlp(h)


class Transformer(nn.Module):
    """Native runtime. Submodule names match transformers' so state dicts load unchanged."""

    is_native = True

    def __init__(self, a: ModelArgs, rope_cos: torch.Tensor, rope_sin: torch.Tensor):
        super().__init__()
        self.args = a
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size)
        self.layers = nn.ModuleList(Block(a) for _ in range(a.num_layers))
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.lm_head = Linear(a.hidden_size, a.vocab_size, bias=False)
        if a.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("rope_cos", rope_cos, persistent=False)
        self.register_buffer("rope_sin", rope_sin, persistent=False)
        self.k_cache = self.v_cache = None
        self.cache_len = 0
        self.graphs = None  # CUDAGraphs once enable_cuda_graphs() is called

    # -- interface -------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def vocab_size(self) -> int:
        return self.args.vocab_size

    @property
    def device(self):
        return self.embed_tokens.weight.device

    @property
    def dtype(self):
        return self.embed_tokens.weight.dtype

    @property
    def max_len(self) -> int:
        return self.rope_cos.shape[0]

    def reset(self, max_len: int) -> None:
        if max_len > self.max_len:
            raise QuasarError(
                f"prompt + max_new_tokens = {max_len} positions exceeds the runtime's RoPE table "
                f"({self.max_len}); lower max_new_tokens= or model.max_seq_len= is too small"
            )
        a = self.args
        shape = (self.num_layers, a.num_kv_heads, max_len, a.head_dim)
        if self.graphs is not None:  # graphs captured the cache's address: allocate it once, full size
            shape = (self.num_layers, a.num_kv_heads, self.graphs.max_len, a.head_dim)
            if max_len > shape[2]:
                raise QuasarError(f"{max_len} positions exceed the CUDA-graph cache ({shape[2]}); "
                                  "raise model.max_seq_len=")
        if self.k_cache is None or self.k_cache.shape != shape:
            self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.cache_len = 0

    def rollback(self, n: int) -> None:
        assert 0 <= n <= self.cache_len, (n, self.cache_len)
        self.cache_len = n

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, layer_ids=None) -> torch.Tensor:
        start, t = self.cache_len, input_ids.shape[0]
        if start + t > self.k_cache.shape[2]:
            raise RuntimeError(f"KV cache overflow: {start + t} > {self.k_cache.shape[2]}")
        if self.graphs is not None and t <= self.graphs.max_tokens:
            logits = self.graphs.run(input_ids, start, layer_ids)
        else:
            x, delta = self.run_layers(self.embed_tokens(input_ids), start, layer_ids, use_cache=True, pending=True)
            logits = self.logits(x, delta)
        self.cache_len = start + t
        return logits

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor) -> None:
        start, t = self.cache_len, input_ids.shape[0]
        if (self.graphs is not None and t <= self.graphs.max_tokens) or start + t > self.k_cache.shape[2]:
            self.forward(input_ids)  # the captured graph (or forward's overflow error)
            return
        self.run_layers(self.embed_tokens(input_ids), start, use_cache=True, pending=True)
        self.cache_len = start + t

    def final_hidden(self, x, delta):
        """The final norm of the residual stream plus the last block's pending output."""
        return Elementwise.add_rms_norm(x, delta, self.norm.weight, self.norm.eps)[1]

    def logits(self, x, delta):
        return self.lm_head(self.final_hidden(x, delta)).float()

    @torch.inference_mode()
    def forward_fp32_head(self, input_ids: torch.Tensor) -> torch.Tensor:
        """forward() with the last residual add, the final norm and the LM head in fp32 (never a
        CUDA graph): the fidelity pass's logits, so a bf16 or quantized verifier's KL is not the
        rounding of a bf16 LM head. A quantized head (verifier.lm_head=true) keeps its quantized
        weight, applied in fp32 by the reference backend."""
        start, t = self.cache_len, input_ids.shape[0]
        if start + t > self.k_cache.shape[2]:
            raise RuntimeError(f"KV cache overflow: {start + t} > {self.k_cache.shape[2]}")
        x, delta = self.run_layers(self.embed_tokens(input_ids), start, use_cache=True, pending=True)
        self.cache_len = start + t
        h = rms_norm(x.float() + delta.float(), self.norm.weight.float(), self.norm.eps)
        return linear_fp32(self.lm_head, h)

    def uses_fused_attention(self, t: int) -> bool:
        """Whether a cached forward of t tokens runs the fused attention kernels (FusedAttention)."""
        a = self.args
        return (FusedAttention.enabled and self.device.type in FusedAttention.devices and t <= FusedAttention.max_tokens
                and hasattr(self.layers[0].self_attn, "qkv_proj") and a.head_dim >= 16
                and a.head_dim & (a.head_dim - 1) == 0)

    def static_forward(self, input_ids: torch.Tensor, pos: torch.Tensor, span: int, layer_ids=None) -> torch.Tensor:
        """The layers (all, or `layer_ids`) at positions `pos` attending to the first `span` cache
        slots: fixed shapes. In three stages, which CUDA graphs capture separately (cuda_graphs.py)."""
        state = self.static_begin(input_ids, pos, span)
        self.static_layers(state, range(self.num_layers) if layer_ids is None else layer_ids)
        return self.static_end(state)

    def static_begin(self, input_ids: torch.Tensor, pos: torch.Tensor, span: int) -> dict:
        x = self.embed_tokens(input_ids)
        t = input_ids.shape[0]
        return {"x": x, "delta": None, "pos": pos, "span": span, "cos": self.rope_cos[pos].to(x.dtype),
                "sin": self.rope_sin[pos].to(x.dtype),
                "mask": None if self.uses_fused_attention(t) else causal_mask(pos, span, x.dtype)}

    def static_layers(self, state: dict, layer_ids) -> None:
        for i in layer_ids:
            state["x"], state["delta"] = self.layers[i].forward_pending(
                state["x"], state["delta"], state["cos"], state["sin"], (self.k_cache[i], self.v_cache[i]),
                state["pos"], state["mask"], state["span"])

    def static_end(self, state: dict) -> torch.Tensor:
        delta = state["delta"]
        return self.logits(state["x"], delta if delta is not None else torch.zeros_like(state["x"]))

    @torch.inference_mode()
    def forward_batch(self, input_ids: torch.Tensor, starts: torch.Tensor, k_cache, v_cache, span: int,
                      index: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V] (fp32) of B sequences, row b's tokens at positions starts[b]..starts[b]+T-1
        of its own cache row (k_cache/v_cache [L, B, n_kv, S, D]), attending to its first `span` slots
        (>= every row's end; later slots are masked). Fixed shapes for fixed (B, T, span, len(index)):
        CUDA graphs capture it (batching.py). Unfused attention: the fused kernels serve one sequence.
        `index` (packed forward): the flat slots b * T + j the embeddings, norms and linears run on
        (BatchPositions); the other slots' logits are zero. `out`: a [B, T, V] fp32 buffer to write
        the logits into (one buffer for every CUDA graph) instead of a new tensor."""
        b, t = input_ids.shape
        pos = starts[:, None] + torch.arange(t, device=input_ids.device)
        ids, flat_pos = input_ids.reshape(-1), pos.reshape(-1)
        if index is not None:
            ids, flat_pos = ids[index], flat_pos[index]
        x = self.embed_tokens(ids)
        cos = self.rope_cos[flat_pos].to(x.dtype)
        sin = self.rope_sin[flat_pos].to(x.dtype)
        seen = torch.arange(span, device=x.device)[None, None, :] <= pos[:, :, None]
        mask = torch.zeros(seen.shape, dtype=x.dtype, device=x.device).masked_fill_(~seen, float("-inf"))[:, None]
        where, delta = BatchPositions(pos, index), None
        for i, layer in enumerate(self.layers):
            x, delta = layer.forward_pending(x, delta, cos, sin, (k_cache[i], v_cache[i]), where, mask, span)
        h = self.final_hidden(x, delta if delta is not None else torch.zeros_like(x))
        if index is not None:  # back to the [B, T] grid: the loop reads logits per row
            h = h.new_zeros(b * t, h.shape[1]).index_copy_(0, index, h)
        logits = self.lm_head(h).view(b, t, -1)
        return logits.float() if out is None else out.copy_(logits)

    def enable_cuda_graphs(self, max_tokens: int = 16, max_len: int | None = None, bucket: int = 256) -> None:
        """Replay CUDA graphs for every forward of up to `max_tokens` tokens (AR steps and verify
        steps), so the measured time is the model's, not Python's launch overhead."""
        from .cuda_graphs import CUDAGraphs

        max_len = max_len or self.max_len
        if all(self.uses_fused_attention(t) for t in range(1, max_tokens + 1)):
            bucket = max_len  # the fused attention reads the filled length itself: one span
        self.graphs = CUDAGraphs(self, max_tokens, max_len, bucket)
        self.k_cache = None

    def release(self) -> None:
        """Drop the KV cache and any CUDA graphs (their memory, and what a copy must not carry)."""
        self.graphs = None
        self.k_cache = self.v_cache = None
        self.cache_len = 0

    def run_layers(self, h, start, layer_ids=None, use_cache=True, collect=None, pending=False):
        """The hidden state after the layers (all, or `layer_ids`), or with pending=True the
        (residual, last block's un-added output) pair that `logits` finishes."""
        t = h.shape[0]
        cos = self.rope_cos[start : start + t].to(h.dtype)
        sin = self.rope_sin[start : start + t].to(h.dtype)
        fused = use_cache and self.uses_fused_attention(t)
        mask = None if fused else causal_mask(start + torch.arange(t, device=h.device),
                                              start + t if use_cache else t, h.dtype)
        x, delta = h, None
        for i in range(self.num_layers) if layer_ids is None else layer_ids:
            kv = (self.k_cache[i], self.v_cache[i]) if use_cache else None
            x, delta = self.layers[i].forward_pending(x, delta, cos, sin, kv, start, mask)
            if collect is not None:
                collect.append(x + delta)
        if pending:
            return x, delta if delta is not None else torch.zeros_like(x)
        return x if delta is None else x + delta

    @torch.inference_mode()
    def hidden_states(self, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """[embeddings, after layer 0, ..., after layer L-1] for one sequence, without the cache."""
        h = self.embed_tokens(input_ids)
        out = [h]
        self.run_layers(h, 0, use_cache=False, collect=out)
        return out

    def sibling(self) -> "Transformer":
        """A runtime over these same weights with a cache of its own (one per sequence of a batch)."""
        return self.with_layers(list(range(self.num_layers)))

    def with_layers(self, keep: list[int]) -> "Transformer":
        """A runtime sharing this one's weights that runs only the layers in `keep` (pruning)."""
        new = Transformer.__new__(Transformer)
        nn.Module.__init__(new)
        new.args = ModelArgs(**{**self.args.__dict__, "num_layers": len(keep)})
        new.embed_tokens, new.norm, new.lm_head = self.embed_tokens, self.norm, self.lm_head
        new.layers = nn.ModuleList(self.layers[i] for i in keep)
        new.register_buffer("rope_cos", self.rope_cos, persistent=False)
        new.register_buffer("rope_sin", self.rope_sin, persistent=False)
        new.k_cache = new.v_cache = None
        new.cache_len = 0
        new.graphs = None
        return new


def rope_tables(hf_model, max_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [max_len, head_dim] from the model's own rotary module: every RoPE variant
    transformers implements (default, llama3, yarn, dynamic...) comes out exactly as it computes it."""
    rotary = hf_model.model.rotary_emb
    pos = torch.arange(max_len, device=device)[None]
    dummy = torch.zeros(1, dtype=torch.float32, device=device)
    with torch.no_grad():
        cos, sin = rotary(dummy, pos)
    return cos[0].float(), sin[0].float()


def native_from_hf(hf_model, max_len: int = 4096) -> Transformer:
    """Copy a transformers Llama/Qwen2/Qwen3/Mistral model into the native runtime (weights shared)."""
    c = hf_model.config
    if getattr(c, "sliding_window", None) and getattr(c, "use_sliding_window", True) and c.sliding_window < max_len:
        raise QuasarError("sliding-window attention is not implemented natively; use model.runtime=hf")
    a = ModelArgs.from_hf_config(c)
    device, dtype = hf_model.device, hf_model.dtype
    cos, sin = rope_tables(hf_model, max_len, device)
    with torch.device("meta"):
        model = Transformer(a, torch.empty(0), torch.empty(0))
    sd = {k.removeprefix("model."): v for k, v in hf_model.state_dict().items()}
    if a.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    missing = [m for m in missing if not (a.tie_word_embeddings and m == "lm_head.weight")]
    unexpected = [u for u in unexpected if "rotary" not in u]
    if missing or unexpected:
        raise QuasarError(f"cannot map {c.model_type} weights onto the native runtime (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}); use model.runtime=hf")
    if a.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rope_cos, model.rope_sin = cos, sin
    model = model.to(device=device, dtype=dtype).eval()
    model.rope_cos, model.rope_sin = cos, sin  # kept in fp32; cast per forward like transformers
    return model
