"""Where one decode step's time goes, Qwen3-8B shapes, random weights, on the engine the harness
times (verifiers.build_verifier, fused projections, compiled element-wise ops, CUDA graphs).

    python experiments/profile_step.py [--configs reference:-:1:1,int4:cuda:1:1] [--tokens 1,6] [--out DIR]

For each configuration and token count: the CUDA-graph replay time (median of 50, CUDA events) and
a CUPTI profile of 10 replays, kernels grouped by what they do (weight GEMMs, attention, element-wise,
KV-cache writes, other). The gap between the replay time and the summed kernel time is the time the
GPU sits between kernels (launch latency inside the graph, ramp-down / ramp-up).
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.step_speed import K, POS, build_engine, parse_configs, random_qwen3  # noqa: E402

# kernel-name pattern -> what it does (first match wins)
CATEGORIES = [
    ("int4 GEMM (ours, CUDA)", r"w4a16_verify"),
    ("quantized GEMM (ours, Triton)", r"w4a16|w8a16|w8a8|splitk|_reduce_partials"),
    ("torch int GEMM", r"int4pack|int8pack|_int_mm|igemm|s8"),
    ("cuBLAS GEMM", r"nvjet|gemm|cutlass|sm90_xmma|splitKreduce"),
    ("attention", r"sdpa|fmha|flash|attention|softmax"),
    ("fused attention (ours, Triton)", r"_qkv_rope_cache|_partial_kernel|_combine_kernel"),
    ("element-wise (compiled)", r"^triton_"),
    ("KV-cache write / index", r"index|scatter|gather|copy|Cat"),
    ("element-wise (eager)", r"elementwise|reduce_kernel|vectorized"),
]


def category(name: str) -> str:
    return next((c for c, pat in CATEGORIES if re.search(pat, name)), "other")


def replay_ms(rt, ids, n: int = 50) -> float:
    def once():
        rt.cache_len = POS
        rt.forward(ids)
    for _ in range(5):
        once()
    times = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        rt.cache_len = POS
        a.record()
        rt.forward(ids)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[n // 2]


def profile(rt, ids, n: int = 10):
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof_ctx

    with prof_ctx(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            rt.cache_len = POS
            rt.forward(ids)
        torch.cuda.synchronize()
    from torch.autograd import DeviceType

    kernels: dict[str, float] = {}
    counts: dict[str, float] = {}
    for e in prof.events():  # kernel records only (CPU-side ops would count their kernels twice)
        if e.device_type == DeviceType.CUDA and not e.name.startswith("Memcpy"):
            kernels[e.name] = kernels.get(e.name, 0.0) + e.time_range.elapsed_us() / n
            counts[e.name] = counts.get(e.name, 0) + 1 / n
    kernels = list(kernels.items())
    return kernels, counts


def report(label: str, t: int, ms: float, kernels, counts) -> str:
    by_cat: dict[str, list] = {}
    for name, us in kernels:
        by_cat.setdefault(category(name), []).append((name, us))
    total = sum(us for _, us in kernels) / 1e3
    lines = [f"## {label}, T={t}: graph replay {ms:.3f} ms; kernels {total:.3f} ms; "
             f"between kernels {ms - total:.3f} ms", "",
             "| what | ms per step | share of replay | kernels per step |", "|---|---|---|---|"]
    for cat, items in sorted(by_cat.items(), key=lambda kv: -sum(u for _, u in kv[1])):
        lines.append(f"| {cat} | {sum(u for _, u in items) / 1e3:.3f} | {sum(u for _, u in items) / 1e3 / ms:.1%} | "
                     f"{sum(counts.get(n, 0) for n, _ in items):.0f} |")
    lines += ["", "| kernel | what | µs per step | calls per step |", "|---|---|---|---|"]
    for name, us in sorted(kernels, key=lambda kv: -kv[1])[:25]:
        lines.append(f"| `{name[:90]}` | {category(name)} | {us:.1f} | {counts.get(name, 0):.0f} |")
    return "\n".join(lines) + "\n"


def subset_ms(rt, layer_ids, graphs: bool, n: int = 20) -> float:
    """One-token forward over a layer subset (a self-speculative drafter's step), replayed from a
    CUDA graph or eager, ms per call (CUDA events around n back-to-back calls)."""
    saved = rt.graphs
    rt.graphs = saved if graphs else None
    ids = torch.randint(0, rt.vocab_size, (1,), device=rt.device)
    try:
        for _ in range(3):  # the first call captures the subset's graph
            rt.cache_len = POS
            rt.forward(ids, layer_ids=layer_ids)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(n):
            rt.cache_len = POS
            rt.forward(ids, layer_ids=layer_ids)
        b.record()
        torch.cuda.synchronize()
        return a.elapsed_time(b) / n
    finally:
        rt.graphs = saved


def loop_trace(rt, label: str, out: Path | None) -> str:
    """The decode loop itself (synthetic drafter, forced alpha = 0.8, k = K) under the profiler:
    verify wall time per step vs the GPU time of its kernels; the difference is the loop's own
    latency (Python, host syncs, copies). Writes a Chrome trace when `out` is given."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof_ctx

    from quasar_bench.decode import generate
    from quasar_bench.drafters import make_drafter

    drafter = make_drafter({"name": "synthetic", "alpha": 0.8, "k": K, "acceptance": "forced"}, rt)
    prompt = list(range(100, 164))
    run = lambda: generate(rt, drafter, prompt, 48, K, generator=torch.Generator().manual_seed(0))  # noqa: E731
    run()
    with prof_ctx(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        res = run()
    if out:
        prof.export_chrome_trace(str(out / ("trace_" + re.sub(r"[^A-Za-z0-9]+", "_", label) + ".json")))
    gpu_us = sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA)
    steps = res.verify_steps
    return (f"loop ({label}): {steps} verify steps, verify {1e3 * res.verify_s / steps:.3f} ms/step, draft "
            f"{1e3 * res.draft_s / steps:.3f}, decode {1e3 * res.decode_s / steps:.3f} ms/step (profiled); GPU kernel "
            f"time {gpu_us / 1e3 / steps:.3f} ms/step (prefill included)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="reference:-:1:1,int4:cuda:1:1")
    ap.add_argument("--tokens", default="1,6")
    ap.add_argument("--out", default=None)
    ap.add_argument("--loop", action="store_true", help="also profile the decode loop and a layer-subset forward")
    args = ap.parse_args(argv)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    loaded = random_qwen3()
    text = [f"# Decode-step profile, Qwen3-8B shapes, random weights, {torch.cuda.get_device_name()}, torch "
            f"{torch.__version__}\n\ncommand: `python experiments/profile_step.py {' '.join(argv or sys.argv[1:])}`\n"]
    for engine in parse_configs(args.configs):
        rt, _, _ = build_engine(loaded, engine)
        label = engine.label
        for t in (int(x) for x in args.tokens.split(",")):
            ids = torch.randint(0, rt.vocab_size, (t,), device=rt.device)
            ms = replay_ms(rt, ids)
            section = report(label, t, ms, *profile(rt, ids))
            print(section, flush=True)
            text.append(section)
        if args.loop:
            half = list(range(0, rt.num_layers, 2))
            extra = [loop_trace(rt, label, Path(args.out) if args.out else None),
                     f"half the layers, 1 token ({label}): graph {subset_ms(rt, half, True):.3f} ms, "
                     f"eager {subset_ms(rt, half, False):.3f} ms"]
            print("\n".join(extra), flush=True)
            text.append("\n".join(f"- {x}" for x in extra) + "\n")
        rt.release()
        del rt
        torch.cuda.empty_cache()
    if args.out:
        (Path(args.out) / "profile_step.md").write_text("\n".join(text))


if __name__ == "__main__":
    main()
