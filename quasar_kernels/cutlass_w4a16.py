"""CUTLASS's Hopper mixed-input GEMM (int4 weights x bf16 activations) as a baseline for the W4A16 kernels.

The kernel table (`python -m quasar_kernels.bench_w4a16_cuda --kernels ...,w4a16_cutlass`) times it beside
cuBLAS and ours: it is the warpgroup-MMA collective of NVIDIA's CUTLASS that vLLM's Machete is built on, so
it answers "what does the library reach at the verify pass's shapes". The decode loop never calls it.

Build: the CUTLASS headers come from the `nvidia-cutlass` package (`pip install nvidia-cutlass==4.2.0.0`;
headers only, nothing of it runs), compiled for sm_90a by torch.utils.cpp_extension at first use, one
object per tile configuration (csrc/cutlass/c*.cu, in parallel).

Weights: CUTLASS computes with scale * q + zero, q a signed int4 in [-8, 7] and scale, zero bf16 per group.
`prepare` maps this project's quantization (s * (c - z), c in [0, 15], fp16 s and z) onto it as q = c - 8,
zero = s * (8 - z): the same bytes moved and the same work, though the bf16 rounding of scale and zero
makes the weights differ from ours in the last bits. Its outputs are checked against the weight CUTLASS
is given (`dequantized(codes, prepared)`), not against ours.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

CSRC = Path(__file__).parent / "csrc" / "cutlass"
CUTLASS_PIN = "nvidia-cutlass==4.2.0.0"
_EXT = None


class CutlassUnavailable(RuntimeError):
    """The baseline cannot be built here (no nvidia-cutlass package, or no Hopper GPU): the message says which."""


def cutlass_include_dirs() -> list[Path]:
    """The CUTLASS / CuTe headers and CUTLASS's tools/util headers, from the installed nvidia-cutlass package."""
    import importlib.util

    try:  # located, not imported: only its headers are used, and its Python side has dependencies of its own
        spec = importlib.util.find_spec("cutlass_library")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        raise CutlassUnavailable(f"the CUTLASS baseline needs the nvidia-cutlass package: pip install {CUTLASS_PIN}")
    root = Path(spec.origin).parent / "source"
    dirs = [root / "include", root / "tools" / "util" / "include"]
    if not (dirs[0] / "cutlass" / "cutlass.h").is_file() or not (dirs[1] / "cutlass" / "util" / "mixed_dtype_utils.hpp").is_file():
        raise CutlassUnavailable(f"nvidia-cutlass at {root} lacks its C++ headers: reinstall it with pip install {CUTLASS_PIN}")
    return dirs


def _cuda_has_curand() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME

    return bool(CUDA_HOME) and (Path(CUDA_HOME) / "include" / "curand_kernel.h").is_file()


def extension():
    """The compiled baseline (built once per machine into torch's extension cache)."""
    global _EXT
    if _EXT is not None:
        return _EXT
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        raise CutlassUnavailable("the CUTLASS baseline is built for Hopper (sm_90a) GPUs only")
    from torch.utils.cpp_extension import load

    includes = [str(p) for p in cutlass_include_dirs()] + [str(CSRC)]
    if not _cuda_has_curand():
        includes.append(str(CSRC / "no_curand"))  # see the comment in that header
    sources = [CSRC / "w4a16_cutlass_binding.cpp", CSRC / "w4a16_cutlass_reorder.cu", *sorted(CSRC.glob("c*.cu"))]
    os.environ.setdefault("MAX_JOBS", str(min(len(sources), os.cpu_count() or 1)))
    _EXT = load(name="quasar_cutlass_w4a16", sources=[str(s) for s in sources], extra_include_paths=includes,
                extra_cflags=["-O3"],
                extra_cuda_cflags=["-O3", "--expt-relaxed-constexpr", "-DNDEBUG",
                                   "-gencode=arch=compute_90a,code=sm_90a", "-diag-suppress=20012"],
                verbose=False)
    return _EXT


def cutlass_form(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int) -> dict:
    """This project's int4 (codes uint8 [N, K] in 0..15, scales / zero codes [K / G, N]) in CUTLASS's form,
    before the reorder: int4 values c - 8 packed two per byte (value 2i in the low nibble) [N, K / 2], bf16
    scale and additive zero [K / G, N]."""
    n, k = codes.shape
    if k % group or k % 64 or n % 64:
        raise ValueError(f"CUTLASS baseline: N = {n} and K = {k} must be multiples of 64 and K of the group size {group}")
    q = (codes.to(torch.int16) - 8).to(torch.uint8) & 0xF  # two's-complement nibbles of c - 8
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()
    scale = scales.to(torch.bfloat16).contiguous()
    zero = (scales.float() * (8.0 - zeros.float())).to(torch.bfloat16).contiguous()
    return dict(w=packed, scale=scale, zero=zero, n=n, k=k, group=group)


def prepare(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int) -> dict:
    """`cutlass_form` with the weights reordered on the GPU into the layout every instance reads."""
    form = cutlass_form(codes, scales, zeros, group)
    form["w"] = extension().reorder(form["w"], form["n"], form["k"])
    return form


def dequantized(codes: torch.Tensor, prepared: dict) -> torch.Tensor:
    """fp32 [N, K]: the weight CUTLASS multiplies by (scale * (c - 8) + zero, with its bf16 scale and zero)."""
    n, k, g = prepared["n"], prepared["k"], prepared["group"]
    q = codes.float().view(n, k // g, g) - 8.0
    s = prepared["scale"].float().t().reshape(n, k // g, 1)
    z = prepared["zero"].float().t().reshape(n, k // g, 1)
    return (q * s + z).view(n, k)


def candidates() -> list[tuple[str, int]]:
    """(instance, splits) pairs to time: splits 0 = data-parallel tiles, 1 = stream-K as the library's heuristic
    decides, S > 1 = split-K into S parts (stream-K instances only; the ping-pong ones are data-parallel)."""
    out = []
    for name in extension().names():
        out += [(name, s) for s in ((0, 1, 2, 4, 8) if name.endswith("_sk") else (0,))]
    return out


_WORKSPACES: dict = {}


def linear(x: torch.Tensor, prepared: dict, name: str, splits: int) -> torch.Tensor:
    """x [M, K] bf16 @ W^T with one instance; the workspace it asks for is allocated once per (instance, shape)."""
    ext = extension()
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    key = (name, splits, x.shape[0], prepared["n"], prepared["k"], x.device)
    ws = _WORKSPACES.get(key)
    if ws is None:
        ok, nbytes = ext.query(name, x, prepared["w"], prepared["scale"], prepared["zero"], prepared["group"], splits, sms)
        if not ok:
            raise ValueError(f"CUTLASS {name} (splits {splits}) cannot run M={x.shape[0]} N={prepared['n']} K={prepared['k']}")
        ws = _WORKSPACES[key] = torch.empty(max(nbytes, 0), dtype=torch.uint8, device=x.device)
    return ext.gemm(name, x, prepared["w"], prepared["scale"], prepared["zero"], prepared["group"], splits, sms, ws)
