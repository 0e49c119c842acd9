"""Quantized linear modules holding the packed tensors of packing.py, and the RTN transforms.

Modules (drop-in replacements for nn.Linear inside the native runtime):

    Int4Linear  W4A16: qweight int32 [Kp//8, N], scales/zeros fp16 [Kp//G, N], in_features, group_size
    Int8Linear  W8A16: qweight int8 [N, K], scales fp16 [N]
    W8A8Linear  int8 weights as Int8Linear + int8 activations with per-token dynamic scales; an
                optional per-input-channel `smooth` [K] (SmoothQuant): the module computes
                W8A8(x / smooth) with the weight stored already multiplied by smooth.

forward(x):
  * CUDA: the Triton kernels of kernels/ (imported lazily, on first CUDA forward). An import
    failure raises QuasarError: there is no silent fallback to the torch path.
  * CPU: the pure-torch function the kernels are checked against (kernels/reference.py): weight
    dequantized to fp32, x @ W^T in fp32, cast to x's dtype. The dequantized fp32 weight is cached
    on the module on first use (`_w_cache`, not a buffer, never saved): it is the same function,
    computed once instead of every forward, so a quantized verifier runs on CPU at the speed of
    the fp32 model. `free_cache()` drops it. For W8A8 the CPU path quantizes the activations per
    token exactly like the kernel (absmax/127, round half away from zero) and sums the int8 products
    exactly (torch._int_mm, int32; the cache holds the transposed int8 codes), so W8A8 outputs do not
    depend on the batch size (T=1 AR steps and T=k+1 verify steps agree bit for bit).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import QuasarError
from .packing import (SCALE_DTYPE, check_int4_group, dequantize_int4, dequantize_int8, pack_int4,
                      quantize_int4_rtn, quantize_int8_rtn)

# Names of the decoder-layer linears, transformers' naming (runtime.py).
ATTN_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")

_KERNELS = None


def cuda_kernels():
    """The Triton kernels package, imported on first CUDA use; a clear error if it cannot be."""
    global _KERNELS
    if _KERNELS is None:
        try:
            import kernels  # noqa: PLC0415

            _KERNELS = kernels
        except Exception as e:  # ImportError, triton missing, driver problems
            raise QuasarError(f"quantized verifier on CUDA needs the Triton kernels (kernels/): import failed "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}); "
                              "install triton (`pip install -e .[triton]`) or run the verifier on CPU") from None
    return _KERNELS


def quantize_per_token(x: torch.Tensor):
    """(x_int8 codes as float, x_scales fp32): scale = absmax/127 per row floored at 1e-10, round half
    away from zero, like kernels/reference.py quantize_per_token_ref."""
    xf = x.float()
    scale = (xf.abs().amax(-1) / 127.0).clamp(min=1e-10)
    v = xf / scale[..., None]
    q = (torch.sign(v) * torch.floor(v.abs() + 0.5)).clamp(-127, 127)
    return q, scale


class _QuantLinear(nn.Module):
    """Shared bits: bias, the CPU dequantized-weight cache."""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        if bias is not None:
            self.register_buffer("bias", bias.detach().clone())
        else:
            self.bias = None
        self._w_cache = None

    def dequantize(self) -> torch.Tensor:
        raise NotImplementedError

    def cpu_weight(self) -> torch.Tensor:
        if self._w_cache is None:
            self._w_cache = self.dequantize().float()
        return self._w_cache

    def free_cache(self) -> None:
        self._w_cache = None

    def _apply(self, fn, recurse=True):  # .to()/.cuda() invalidate the CPU cache
        self._w_cache = None
        return super()._apply(fn, recurse)

    def _cpu_linear(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.cpu_weight(), b).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int4Linear(_QuantLinear):
    """W4A16, asymmetric, groups of `group_size` input channels (packing.py int4 format)."""

    def __init__(self, qweight, scales, zeros, in_features: int, group_size: int, bias=None):
        check_int4_group(group_size)
        super().__init__(in_features, qweight.shape[1], bias)
        kp = qweight.shape[0] * 8
        if kp % group_size or kp < in_features or kp - in_features >= group_size:
            raise QuasarError(f"int4 tensors hold {kp} packed input channels, which does not fit "
                              f"in_features={in_features} with group_size={group_size}; re-quantize")
        if scales.shape != (kp // group_size, qweight.shape[1]) or zeros.shape != scales.shape:
            raise QuasarError(f"int4 scales/zeros must be [{kp // group_size}, {qweight.shape[1]}], got "
                              f"{tuple(scales.shape)}/{tuple(zeros.shape)}; re-quantize")
        self.group_size = group_size
        self.register_buffer("qweight", qweight.to(torch.int32).contiguous())
        self.register_buffer("scales", scales.to(SCALE_DTYPE).contiguous())
        self.register_buffer("zeros", zeros.to(SCALE_DTYPE).contiguous())

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128) -> "Int4Linear":
        codes, scales, zeros = quantize_int4_rtn(linear.weight, group_size)
        return cls(pack_int4(codes), scales, zeros, linear.in_features, group_size, linear.bias)

    def dequantize(self):
        return dequantize_int4(self.qweight, self.scales, self.zeros, self.in_features, self.group_size)

    def forward(self, x):
        if x.is_cuda:
            return cuda_kernels().w4a16_linear(x, self.qweight, self.scales, self.zeros, self.in_features,
                                               self.group_size, self.bias)
        return self._cpu_linear(x)

    def extra_repr(self):
        return super().extra_repr() + f", group_size={self.group_size}"


class Int8Linear(_QuantLinear):
    """W8A16: symmetric per-output-channel int8 weights, activations in the model's dtype."""

    def __init__(self, qweight, scales, bias=None):
        super().__init__(qweight.shape[1], qweight.shape[0], bias)
        if qweight.dtype != torch.int8 or scales.shape != (qweight.shape[0],):
            raise QuasarError("int8 weights must be int8 [N, K] with scales [N] (packing.py); re-quantize")
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scales", scales.to(SCALE_DTYPE).contiguous())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        q, s = quantize_int8_rtn(linear.weight)
        return cls(q, s, linear.bias)

    def dequantize(self):
        return dequantize_int8(self.qweight, self.scales)

    def forward(self, x):
        if x.is_cuda:
            return cuda_kernels().w8a16_linear(x, self.qweight, self.scales, self.bias)
        return self._cpu_linear(x)


class W8A8Linear(Int8Linear):
    """int8 weights per channel x int8 activations per token (dynamic scales); optional smoothing
    vector: y = W8A8(x / smooth) with qweight quantized from W * smooth."""

    def __init__(self, qweight, scales, bias=None, smooth=None):
        super().__init__(qweight, scales, bias)
        if smooth is not None:
            if smooth.shape != (self.in_features,):
                raise QuasarError(f"w8a8 smooth vector must be [{self.in_features}]; re-quantize")
            self.register_buffer("smooth", smooth.float().contiguous())
        else:
            self.smooth = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, smooth: torch.Tensor | None = None) -> "W8A8Linear":
        w = linear.weight.detach().float()
        if smooth is not None:
            w = w * smooth.float()[None, :]
        q, s = quantize_int8_rtn(w)
        return cls(q, s, linear.bias, smooth)

    def _smoothed(self, x):
        return x if self.smooth is None else (x / self.smooth.to(x.dtype))

    def forward(self, x):
        x = self._smoothed(x)
        if x.is_cuda:
            return cuda_kernels().w8a8_linear(x, self.qweight, self.scales, self.bias)
        xq, xs = quantize_per_token(x)
        # Integer products summed exactly (int32), so a row's output does not depend on how many
        # rows share the call: T=1 (AR) and T=k+1 (verify) agree bit for bit, and per-token
        # quantization cannot turn GEMM rounding noise into a flipped int8 step.
        codes = xq.reshape(-1, self.in_features).to(torch.int8)
        if self._w_cache is None:
            self._w_cache = self.qweight.t().contiguous()
        try:
            acc = torch._int_mm(codes, self._w_cache).double()
        except RuntimeError:  # shapes _int_mm refuses: float64 sums of int8 products are exact too
            acc = codes.double() @ self._w_cache.double()
        y = (acc * self.scales.double()[None, :]).float().reshape(*x.shape[:-1], -1) * xs[..., None]
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# module-tree helpers and RTN transforms
# ---------------------------------------------------------------------------------------------

def decoder_linears(runtime):
    """(layer index, parent module, attribute name, nn.Linear) for every decoder-layer linear;
    lm_head and embeddings are not included (kept in high precision)."""
    out = []
    for i, layer in enumerate(runtime.layers):
        for name in ATTN_LINEARS:
            out.append((i, layer.self_attn, name, getattr(layer.self_attn, name)))
        for name in MLP_LINEARS:
            out.append((i, layer.mlp, name, getattr(layer.mlp, name)))
    return out


def clone_runtime(runtime):
    """A new native runtime object with its own module tree and KV cache, sharing every tensor with
    `runtime` (which is left untouched). Replace submodules of the clone freely."""
    import copy

    if not getattr(runtime, "is_native", False):
        raise QuasarError("this verifier transform needs the native runtime (llama/qwen2/qwen3/mistral); "
                          "the loaded model uses the generic transformers path (model.runtime=hf)")
    memo = {}
    for t in list(runtime.parameters()) + list(runtime.buffers()):
        memo[id(t)] = t
    for attr in ("k_cache", "v_cache", "graphs"):  # per-runtime state, never copied
        if getattr(runtime, attr, None) is not None:
            memo[id(getattr(runtime, attr))] = None
    new = copy.deepcopy(runtime, memo)
    new.k_cache = new.v_cache = new.graphs = None
    new.cache_len = 0
    return new


def cast_runtime(runtime, dtype: torch.dtype):
    """Clone with every floating parameter cast to dtype (new tensors; RoPE tables stay fp32)."""
    new = clone_runtime(runtime)
    done = {}
    for mod in new.modules():
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            if id(p) not in done:
                done[id(p)] = p if p.dtype == dtype or not p.is_floating_point() else \
                    nn.Parameter(p.detach().to(dtype), requires_grad=False)
            mod._parameters[name] = done[id(p)]
    return new


def rtn_transform(runtime, make) -> object:
    """Clone `runtime` and replace each decoder linear by make(linear)."""
    new = clone_runtime(runtime)
    for _, parent, name, lin in decoder_linears(new):
        setattr(parent, name, make(lin))
    return new


def quant_state(runtime) -> dict[str, torch.Tensor]:
    """The tensors a quantized runtime adds or changes (for the on-disk cache): every buffer of the
    quantized linears plus the RMSNorm weights (SmoothQuant folds scales into them)."""
    sd = {}
    for name, mod in runtime.named_modules():
        if isinstance(mod, _QuantLinear):
            for bname, b in mod.named_buffers(recurse=False):
                if b is not None:
                    sd[f"{name}.{bname}"] = b.contiguous()
    return sd


def free_caches(runtime) -> None:
    for mod in runtime.modules():
        if isinstance(mod, _QuantLinear):
            mod.free_cache()
