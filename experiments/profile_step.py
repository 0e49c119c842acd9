"""Where one decode step's time goes, Qwen3-8B shapes, bf16, random weights (GPU).

    python experiments/profile_step.py [--tokens 1] [--out DIR]

Times a forward of T tokens eagerly and as a CUDA-graph replay (median of 50, CUDA events), then
profiles one eager forward and prints the CUDA kernels by total time: the split between weight
GEMMs (bandwidth-bound) and the small element-wise kernels that a fused implementation would remove.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def median_ms(fn, n=50):
    for _ in range(5):
        fn()
    times = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[n // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from quasar_bench.models import QWEN3_8B_SHAPES, random_hf_model
    from quasar_bench.rows import weight_bytes
    from quasar_bench.runtime import native_from_hf

    hf = random_hf_model(QWEN3_8B_SHAPES, QWEN3_8B_SHAPES["vocab_size"], torch.bfloat16, "cuda", 0)
    rt = native_from_hf(hf, 1024)
    del hf
    t, start = args.tokens, 300
    ids = torch.randint(0, 151936, (t,), device="cuda")
    rt.reset(1024)
    rt.forward(torch.randint(0, 151936, (start,), device="cuda"))

    def eager():
        rt.cache_len = start
        rt.forward(ids)

    eager_ms = median_ms(eager)
    rt.enable_cuda_graphs(max_tokens=t, max_len=1024)
    rt.reset(1024)
    rt.cache_len = start
    graph_ms = median_ms(eager)
    gb = weight_bytes(rt) / 1e9
    lines = [f"T={t}: eager {eager_ms:.2f} ms, CUDA graph {graph_ms:.2f} ms; weights {gb:.2f} GB -> "
             f"{gb / graph_ms * 1e3:.0f} GB/s with graphs"]
    rt.release()
    rt.reset(1024)
    rt.forward(torch.randint(0, 151936, (start,), device="cuda"))
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        eager()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    lines.append(table)
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"profile_T{t}.txt").write_text(text)


if __name__ == "__main__":
    main()
