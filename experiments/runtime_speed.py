"""Native runtime vs the generic transformers runtime on CPU: the same model (SmolLM2-135M-Instruct,
fp32, a Llama), the same verifiers, loaded once with model.runtime=native and once with
model.runtime=hf, timed side by side in one process.

    python experiments/runtime_speed.py --out results/runtime_speed.md [--threads 2] [--repeats 5]

Per runtime x verifier precision (reference, int8, int4 RTN g128), built as the harness builds them
(native: q/k/v and gate/up fused, as fuse_projections=auto does on CPU):
  * AR decode: decode.generate with the `ar` drafter, 64 new tokens after a 100-token prompt,
    tokens per second;
  * the verify step: one forward of T = 6 tokens (k = 5) at position 100, then rolled back;
  * the AR step: one forward of T = 1 at position 100, then rolled back.
Repeats alternate the two runtimes (native, hf, native, hf, ...) so a load change on the machine
hits both; the median over repeats is reported, with the smallest and largest value.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quasar_bench.decode import generate  # noqa: E402
from quasar_bench.drafters import make_drafter  # noqa: E402
from quasar_bench.models import load_model  # noqa: E402
from quasar_bench.verifiers import build_verifier  # noqa: E402

PRECISIONS = {"reference": {"name": "reference"}, "int8": {"name": "int8"}, "int4": {"name": "int4"}}
PROMPT = [(i * 7919) % 49000 + 17 for i in range(100)]  # fixed ids: timing does not depend on text


def step_ms(rt, t: int, n: int = 20) -> float:
    """Median time of a T-token forward at position len(PROMPT), rolled back after each."""
    rt.reset(len(PROMPT) + 16)
    rt.prefill(torch.tensor(PROMPT))
    ids = torch.tensor(PROMPT[:t])
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        rt.forward(ids)
        times.append(time.perf_counter() - t0)
        rt.rollback(len(PROMPT))
    return 1e3 * statistics.median(times)


def measure(rt) -> dict:
    t0 = time.perf_counter()
    res = generate(rt, make_drafter(OmegaConf.create({"name": "ar"}), rt), PROMPT, 64, 0)
    ar = len(res.output_ids) / (time.perf_counter() - t0)
    return {"ar_tok_s": ar, "step1_ms": step_ms(rt, 1), "step6_ms": step_ms(rt, 6)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "runtime_speed.md")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    verifiers = {}
    for kind in ("native", "hf"):
        loaded = load_model(OmegaConf.create({"name": "smollm2", "device": "cpu", "dtype": "fp32", "runtime": kind}))
        for name, vc in PRECISIONS.items():
            verifiers[(kind, name)] = build_verifier(loaded, OmegaConf.create(vc), fuse=kind == "native")
    for rt in verifiers.values():  # warm-up: first-call costs out of the timings
        measure(rt)
    samples = {key: [] for key in verifiers}
    for _ in range(args.repeats):
        for name in PRECISIONS:
            for kind in ("native", "hf"):
                samples[(kind, name)].append(measure(verifiers[(kind, name)]))
    lines = [f"# Native vs generic runtime on CPU: SmolLM2-135M-Instruct, fp32, {args.threads} threads", "",
             f"`python experiments/runtime_speed.py --threads {args.threads} --repeats {args.repeats}` "
             f"({time.strftime('%Y-%m-%d')}; {platform.machine()}, {torch.get_num_threads()} torch threads, "
             f"torch {torch.__version__}). Median over {args.repeats} interleaved repeats (min-max).", "",
             "| verifier | runtime | AR tok/s | T=1 step ms | T=6 verify step ms | generic / native (T=6) |",
             "|---|---|---|---|---|---|"]

    def cell(vals, fmt):
        return f"{statistics.median(vals):{fmt}} ({min(vals):{fmt}}-{max(vals):{fmt}})"
    for name in PRECISIONS:
        native6 = statistics.median(s["step6_ms"] for s in samples[("native", name)])
        for kind in ("native", "hf"):
            s = samples[(kind, name)]
            ratio = statistics.median(x["step6_ms"] for x in s) / native6
            lines.append(f"| {name} | {'native' if kind == 'native' else 'generic (transformers)'} | "
                         f"{cell([x['ar_tok_s'] for x in s], '.1f')} | {cell([x['step1_ms'] for x in s], '.1f')} | "
                         f"{cell([x['step6_ms'] for x in s], '.1f')} | {ratio:.2f}x |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
