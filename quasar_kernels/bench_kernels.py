"""Benchmark the verify GEMMs at Qwen3-8B linear shapes x M = 1..64 on one CUDA GPU.

    python -m quasar_kernels.bench_kernels --out results/gpu [--quick] [--ms 1,2,4] [--shapes q/o,k/v]

Measures the device-to-device copy bandwidth (bytes read + written) first, then for each shape
and M: cuBLAS bf16 F.linear, the Triton W4A16 / W8A16 / W8A8 kernels (W8A8 with its Triton and
torch._int_mm backends and the "auto" choice), torch._weight_int4pack_mm (group 128) and
torch._weight_int8pack_mm. Every kernel is checked against its reference on the GPU before it
is timed. Times: CUDA-graph replays of >= 24 back-to-back calls that rotate over copies of the
weights (one round >= 3 x L2, so every call reads its weight from HBM, as in a whole-model
forward), median of the replays, divided by the calls: Python launch cost is excluded, as under
CUDA graphs in a decode loop; `eager_us` reports the eager per-call wall time beside it.
Writes kernels.csv (every number) and kernels.md (summary) under --out; prints a table last.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = {  # name -> (N, K); Qwen3-8B: hidden 4096, 32 q heads / 8 kv heads x 128, MLP 12288, vocab 151936
    "q/o": (4096, 4096),
    "k/v": (1024, 4096),
    "gate/up": (12288, 4096),
    "down": (4096, 12288),
    "lm_head": (151936, 4096),
}
MS = [1, 2, 4, 8, 16, 32, 64]
GROUP = 128


def driver_version() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
    except Exception:  # noqa: BLE001 (no nvidia-smi: the tables say so)
        return "unknown"


def env_info(cmd: str) -> dict:
    """GPU, driver, versions and the command: what every benchmark row carries."""
    import triton

    return dict(gpu_name=torch.cuda.get_device_name(), driver=driver_version(), torch_version=torch.__version__,
                triton_version=triton.__version__, cuda_version=torch.version.cuda, command=cmd)


def bench(fn, quick: bool) -> float:
    """Median time in microseconds (L2 flushed before each run)."""
    import triton

    ms = triton.testing.do_bench(fn, warmup=5 if quick else 20, rep=20 if quick else 80, return_mode="median")
    return ms * 1e3


def eager_us(fn, n: int = 30) -> float:
    """Wall time per call of back-to-back eager calls (no graph): the Python + launch cost when it
    exceeds the GPU time (weights L2-resident here, so this is not a GPU number)."""
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


def copy_bandwidth(quick: bool) -> float:
    n = 1 << 30  # 1 GiB: far over L2
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src), quick)
    assert torch.equal(dst[:4096], src[:4096])
    del src, dst
    return 2 * n / (t * 1e-6) / 1e9


def rel_err(out, ref) -> float:
    o, r = out.double(), ref.double()
    if not torch.isfinite(o).all():
        return float("inf")
    return ((o - r).norm() / r.norm()).item()


def torch_int4pack(codes, scales, zeros, n, k):
    """The same int4 weights in tinygemm's layout (the `torch` kernel backend's conversion)."""
    from quasar_bench.backends.torch import int4pack

    return int4pack(codes, scales, zeros, k)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="results/gpu")
    p.add_argument("--quick", action="store_true", help="shorter timing loops")
    p.add_argument("--ms", default=",".join(map(str, MS)))
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--tag", default="", help="suffix of the output file names: kernels<tag>.csv/.md")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_kernels needs a CUDA GPU")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("unset TRITON_INTERPRET to benchmark compiled kernels")

    from quasar_kernels import w4a16_linear, w8a8_linear, w8a16_linear
    from quasar_kernels import reference as ref
    from quasar_kernels.splitk import graph_time_us, tuned_config
    from quasar_bench.packing import pack_int4, quantize_int4_rtn, quantize_int8_rtn

    ms_list = [int(m) for m in args.ms.split(",")]
    shapes = [s for s in args.shapes.split(",")]
    cmd = "python -m quasar_kernels.bench_kernels " + " ".join(argv if argv is not None else sys.argv[1:])
    info = env_info(cmd)
    try:
        import gemlite  # noqa: F401
        gemlite_note = "gemlite installed but not wired in"
    except ImportError:
        gemlite_note = "gemlite not installed on this image (skipped)"
    print(info, gemlite_note, flush=True)

    t0 = time.time()
    copy_bw = copy_bandwidth(args.quick)
    print(f"device-to-device copy: {copy_bw:.0f} GB/s (read + write)", flush=True)

    rows, checks = [], []
    torch.manual_seed(0)
    for name in shapes:
        n, k = SHAPES[name]
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        codes, scales, zeros = quantize_int4_rtn(w, GROUP)
        qweight = pack_int4(codes)
        q8, s8 = quantize_int8_rtn(w)
        kp = qweight.shape[0] * 8
        try:
            i4_packed, i4_sz = torch_int4pack(codes, scales, zeros, n, k)
        except Exception as e:  # noqa: BLE001
            i4_packed, i4_sz = None, None
            print(f"torch._convert_weight_to_int4pack failed: {e!r}", flush=True)
        del codes
        s8_bf16 = s8.to(torch.bfloat16)
        w_bytes = {
            "bf16_cublas": n * k * 2,
            "w4a16_triton": n * kp // 2 + 2 * (kp // GROUP) * n * 2,
            "int4pack_mm_torch": n * k // 2 + (k // GROUP) * n * 2 * 2,
            "w8a16_triton": n * k + n * 2,
            "int8pack_mm_torch": n * k + n * 2,
            "w8a8_triton": n * k + n * 2,
            "w8a8_int_mm": n * k + n * 2,
            "w8a8_auto": n * k + n * 2,
        }
        # weight copies, so that one round over them is >= 3 x L2: every call reads its weight from HBM
        l2 = torch.cuda.get_device_properties(0).L2_cache_size

        def copies(tensors, nbytes):
            c = max(1, math.ceil(3 * l2 / nbytes))
            return [tuple(tensors)] + [tuple(t.clone() for t in tensors) for _ in range(c - 1)]

        sets = {"bf16": copies([w], w_bytes["bf16_cublas"]),
                "w4": copies([qweight, scales, zeros], w_bytes["w4a16_triton"]),
                "w8": copies([q8, s8, s8_bf16], w_bytes["w8a16_triton"])}
        if i4_packed is not None:
            sets["i4"] = copies([i4_packed, i4_sz], w_bytes["int4pack_mm_torch"])
        for m in ms_list:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            refs = {}

            def memo(key, f):  # one reference per (kind, M): the w8a8 one is a float64 matmul
                return lambda: refs[key] if key in refs else refs.setdefault(key, f())

            w4ref = memo("w4", lambda: ref.w4a16_linear_ref(x, qweight, scales, zeros, k, GROUP))
            w8ref = memo("w8", lambda: ref.w8a16_linear_ref(x, q8, s8))
            w8a8ref = memo("w8a8", lambda: ref.w8a8_linear_ref(x, q8, s8))
            # kernel -> (weight set, fn(weights) -> output, reference)
            ops = {
                "bf16_cublas": ("bf16", lambda ws: F.linear(x, ws[0]),
                                memo("bf16", lambda: F.linear(x.float(), w.float()).to(x.dtype))),
                "w4a16_triton": ("w4", lambda ws: w4a16_linear(x, ws[0], ws[1], ws[2], k, GROUP), w4ref),
                "w8a16_triton": ("w8", lambda ws: w8a16_linear(x, ws[0], ws[1]), w8ref),
                "w8a8_triton": ("w8", lambda ws: w8a8_linear(x, ws[0], ws[1], backend="triton"), w8a8ref),
                "w8a8_int_mm": ("w8", lambda ws: w8a8_linear(x, ws[0], ws[1], backend="int_mm"), w8a8ref),
                "w8a8_auto": ("w8", lambda ws: w8a8_linear(x, ws[0], ws[1], backend="auto"), w8a8ref),
            }
            if m <= 4:  # torch's int8pack CUDA kernel grows ~linearly with M (40-90 ms at M = 64 for lm_head)
                ops["int8pack_mm_torch"] = ("w8", lambda ws: torch._weight_int8pack_mm(x, ws[0], ws[2]), w8ref)
            if i4_packed is not None:
                ops["int4pack_mm_torch"] = ("i4", lambda ws: torch._weight_int4pack_mm(x, ws[0], GROUP, ws[1]), w4ref)
            t_bf16 = None
            for kname, (set_name, fn_of, ref_fn) in ops.items():
                wsets = sets[set_name]
                try:
                    out = fn_of(wsets[0])  # first call on CUDA also autotunes this (M bucket, N, K)
                    r = ref_fn()
                    err = rel_err(out, r)
                    del out
                    tol = 2e-2 if "w8a8" in kname else 1.2e-2
                    ok = err < tol
                    checks.append((kname, name, m, err, ok))
                    if not ok:
                        print(f"CHECK FAILED {kname} {name} M={m}: rel err {err:.2e}", flush=True)
                        if "torch" not in kname:  # our kernels: never time a wrong kernel
                            continue
                    fns = [(lambda ws=ws: fn_of(ws)) for ws in wsets]
                    t = graph_time_us(fns, calls=max(24, len(fns)), replays=5 if args.quick else 9)
                    t_eager = eager_us(fns[0])
                except Exception as e:  # noqa: BLE001
                    print(f"{kname} {name} M={m} failed: {e!r}"[:300], flush=True)
                    continue
                if kname == "bf16_cublas":
                    t_bf16 = t
                nbytes = w_bytes[kname] + m * k * 2 + m * n * 2
                gbps = nbytes / (t * 1e-6) / 1e9
                cfg = ""
                key_name = {"w4a16_triton": "w4a16", "w8a16_triton": "w8a16", "w8a8_triton": "w8a8-triton",
                            "w8a8_auto": "w8a8-auto"}.get(kname)
                tuned = tuned_config(key_name, m, n, k, x.dtype) if key_name else None
                if tuned:
                    cfg = " ".join(f"{a}={b}" for a, b in tuned.items())
                rows.append(dict(info, kernel=kname, shape=name, M=m, N=n, K=k, time_us=round(t, 2),
                                 gbps=round(gbps, 1), frac_of_copy_bw=round(gbps / copy_bw, 3),
                                 speedup_vs_bf16=round(t_bf16 / t, 3) if t_bf16 else "",
                                 rel_err=f"{err:.2e}", bytes=nbytes, copy_gbps=round(copy_bw, 1),
                                 eager_us=round(t_eager, 1), weight_copies=len(wsets), config=cfg))
            print(f"{name} M={m} done ({time.time() - t0:.0f}s)", flush=True)
        del w, qweight, scales, zeros, q8, s8, i4_packed, i4_sz, sets
        torch.cuda.empty_cache()
        md = write_results(args, rows, info, copy_bw, checks, gemlite_note, ms_list, shapes)  # after each shape

    print(md)
    csv_path = Path(args.out) / f"kernels{args.tag}.csv"
    print(f"wrote {csv_path} and kernels{args.tag}.md in {time.time() - t0:.0f}s")


def write_results(args, rows, info, copy_bw, checks, gemlite_note, ms_list, shapes) -> str:
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(out_dir / f"kernels{args.tag}.csv", rows)
    md = summary_md(rows, info, copy_bw, checks, gemlite_note, ms_list, shapes)
    (out_dir / f"kernels{args.tag}.md").write_text(md)
    return md


def lookup(rows, kernel, shape, m, col):
    """The value of `col` in the row of (kernel, shape, M), or None."""
    return next((r[col] for r in rows if r["kernel"] == kernel and r["shape"] == shape and r["M"] == m), None)


def fmt(v, spec):
    return "–" if v in (None, "") else format(v, spec)


def write_csv(path, rows) -> None:
    if rows:
        with open(path, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=list(rows[0]))
            wr.writeheader()
            wr.writerows(rows)


def check_lines(checks, title: str, limit: int = 20) -> list[str]:
    """The markdown section on the checks made before timing: worst error per kernel, failures."""
    bad = [c for c in checks if not c[4]]
    worst = {}
    for kn, _, _, err, _ in checks:
        worst[kn] = max(worst.get(kn, 0.0), err)
    return ["", f"## {title}", "",
            "Worst ||out - ref|| / ||ref|| per kernel: " + ", ".join(f"{kn} {e:.1e}" for kn, e in worst.items()) + ".",
            f"Failed checks: {len(bad)}" + (": " + ", ".join(f"{c[0]} {c[1]} M={c[2]} ({c[3]:.1e})" for c in bad[:limit])
                                            if bad else ".")]


def summary_md(rows, info, copy_bw, checks, gemlite_note, ms_list, shapes) -> str:
    def get(kernel, shape, m, col):
        return lookup(rows, kernel, shape, m, col)

    lines = [
        f"# Verify GEMM kernels: Qwen3-8B shapes on {info['gpu_name']}",
        "",
        f"driver {info['driver']}, torch {info['torch_version']}, triton {info['triton_version']}; "
        f"`{info['command']}`",
        "",
        f"Device-to-device copy bandwidth (read + write): **{copy_bw:.0f} GB/s**. Times: CUDA-graph "
        "replays of >= 24 back-to-back calls rotating over weight copies (>= 3 x L2 per round: weights "
        "come from HBM), per call, median of the replays; Python launch cost excluded (see eager_us in "
        "the CSV). GB/s counts weight + scales + activations + output bytes once. x is bf16. "
        "torch._weight_int8pack_mm timed at M <= 4 only (it grows linearly with M). " + gemlite_note + ".",
        "",
    ]
    kernels = ["w4a16_triton", "int4pack_mm_torch", "w8a16_triton", "int8pack_mm_torch", "w8a8_auto"]
    lines += ["## Speedup over cuBLAS bf16 F.linear", ""]
    hdr = "| shape | kernel | " + " | ".join(f"M={m}" for m in ms_list) + " |"
    lines += [hdr, "|" + " --- |" * (2 + len(ms_list))]
    for s in shapes:
        for kn in kernels:
            vals = [fmt(get(kn, s, m, "speedup_vs_bf16"), ".2f") for m in ms_list]
            lines.append(f"| {s} | {kn} | " + " | ".join(vals) + " |")
    lines += ["", "## Achieved bandwidth, GB/s (fraction of copy bandwidth)", ""]
    lines += [hdr, "|" + " --- |" * (2 + len(ms_list))]
    for s in shapes:
        for kn in ["bf16_cublas", "w4a16_triton", "w8a16_triton"]:
            vals = [f"{fmt(get(kn, s, m, 'gbps'), '.0f')} ({fmt(get(kn, s, m, 'frac_of_copy_bw'), '.2f')})"
                    for m in ms_list]
            lines.append(f"| {s} | {kn} | " + " | ".join(vals) + " |")
    lines += ["", "## Time, µs", ""]
    lines += [hdr, "|" + " --- |" * (2 + len(ms_list))]
    allk = ["bf16_cublas", "w4a16_triton", "int4pack_mm_torch", "w8a16_triton", "int8pack_mm_torch",
            "w8a8_triton", "w8a8_int_mm", "w8a8_auto"]
    for s in shapes:
        for kn in allk:
            vals = [fmt(get(kn, s, m, "time_us"), ".1f") for m in ms_list]
            lines.append(f"| {s} | {kn} | " + " | ".join(vals) + " |")
    lines += ["", "## W8A8 backend picked by backend=\"auto\" (measured)", ""]
    for s in shapes:
        picks = []
        for m in ms_list:
            cfg = get("w8a8_auto", s, m, "config") or ""
            picks.append(f"M={m}: {'int_mm' if 'int_mm' in cfg else 'triton'}")
        lines.append(f"- {s}: " + ", ".join(picks))
    lines += check_lines(checks, "Checks against the references (before timing)")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
