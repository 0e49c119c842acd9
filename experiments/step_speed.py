"""Verify-step speed at Qwen3-8B shapes (random bf16 weights) on one GPU, per verifier precision x
kernel backend x fused projections, measured side by side in one process.

    python experiments/step_speed.py --out results/gpu [--max-seconds 420]

For each configuration: build the verifier (verifiers.build_verifier, as the harness does), check
its T = 6 logits against the same precision on the `reference` backend (dequantize + fp32 matmul),
capture its CUDA graphs (the time from build to the first timed step is `setup_s`), then time
  * the AR step (T = 1) and the verify step (T = 6, k = 5) as CUDA-graph replays at position 200,
    repeats alternating T = 1 / T = 6, median and p10-p90 spread over the repeats;
  * end to end through decode.generate: AR and the synthetic drafter with acceptance forced at
    alpha = 0.8, k = 5 (identical acceptance sequences for every configuration: the draws depend
    only on the seed and the prompt), 3 random prompts x 128 new tokens.
The bf16 reference is measured first and again last (drift control). Writes step_speed.csv (one
row per configuration and measurement) and step_speed.md, with GPU, driver and versions.
"""
from __future__ import annotations

import argparse
import logging
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.gpu_speed import copy_bandwidth_gbps  # noqa: E402
from quasar_kernels.bench_kernels import driver_version  # noqa: E402
from quasar_bench.decode import generate  # noqa: E402
from quasar_bench.drafters import baseline_drafter, make_drafter  # noqa: E402
from quasar_bench.models import QWEN3_8B_SHAPES, LoadedModel, random_hf_model  # noqa: E402
from quasar_bench.rows import weight_bytes  # noqa: E402
from quasar_bench.runtime import compile_elementwise, fused_attention, native_from_hf  # noqa: E402
from quasar_bench.verifiers import build_verifier  # noqa: E402



class Engine(NamedTuple):
    precision: str
    kernel: str | None  # kernel backend of the quantized linears (None: the precision has none)
    fused: bool  # q/k/v and gate/up as one GEMM each
    compiled: bool  # torch.compile'd element-wise ops
    attention: bool = False  # the fused Triton attention kernels (runtime.FusedAttention)

    @property
    def label(self) -> str:
        return (f"{self.precision}/{self.kernel or '-'}/fused={self.fused}/compiled={self.compiled}"
                f"/attention={self.attention}")


# most important first
CONFIGS = [Engine("reference", None, True, False), Engine("int4", "cuda", True, False),
           Engine("int4", "triton", True, False), Engine("int4", "torch", True, False),
           Engine("int8", "triton", True, False), Engine("w8a8", "triton", True, False),
           Engine("reference", None, False, False), Engine("int4", "triton", False, False),
           Engine("int8", "torch", True, False)]
POS, K, REPS, CALLS = 200, 5, 9, 20
# Random weights: calibration only shapes SmoothQuant's scales, so a small set keeps setup short.
CALIBRATION = {"w8a8": {"calibration": {"n_sequences": 4, "gen_tokens": 16}}}


def step_ms(runtime, t: int) -> float:
    ids = torch.randint(0, runtime.vocab_size, (t,), device=runtime.device)
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    runtime.rollback(POS) if runtime.cache_len >= POS else setattr(runtime, "cache_len", POS)
    a.record()
    for _ in range(CALLS):
        runtime.forward(ids)
        runtime.rollback(POS)
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / CALLS


def e2e(runtime, prompts, drafter_cfg) -> dict:
    drafter = make_drafter(drafter_cfg, runtime) if drafter_cfg else baseline_drafter(runtime)
    tot = dict(new=0, steps=0, decode=0.0, draft=0.0, verify=0.0)
    for p in prompts:
        r = generate(runtime, drafter, p, 128, drafter.k, generator=torch.Generator().manual_seed(0))
        tot["new"] += len(r.output_ids)
        tot["steps"] += r.verify_steps
        tot["decode"] += r.decode_s
        tot["draft"] += r.draft_s
        tot["verify"] += r.verify_s
    s = tot["steps"]
    return {"tokens_per_s": tot["new"] / tot["decode"], "tau": tot["new"] / s, "verify_ms_per_step": 1e3 * tot["verify"] / s,
            "draft_ms_per_step": 1e3 * tot["draft"] / s,
            "other_ms_per_step": 1e3 * (tot["decode"] - tot["draft"] - tot["verify"]) / s}


def random_qwen3() -> LoadedModel:
    """Qwen3-8B shapes, random bf16 weights, on the GPU (nothing is downloaded)."""
    hf = random_hf_model(QWEN3_8B_SHAPES, QWEN3_8B_SHAPES["vocab_size"], torch.bfloat16, "cuda", 0)
    return LoadedModel(name="qwen3_8b_random", runtime=native_from_hf(hf, 1024), tokenizer=None, eos_ids=[], chat=False)


def build_engine(loaded, engine: Engine):
    """The verifier as the harness builds it, checked against the same precision on the reference
    backend (T = K + 1 logits), with every CUDA graph captured: (runtime, rel err, setup seconds)."""
    t0 = time.perf_counter()
    precision, kernel, fuse, compiled, attention = engine
    compile_elementwise(compiled)
    fused_attention(attention)
    name, *flags = precision.split("+")  # e.g. int4+lm_head: verifier.lm_head=true
    vcfg = {"name": name, **dict.fromkeys(flags, True), **({"kernel": kernel} if kernel else {}),
            **CALIBRATION.get(name, {})}
    rt = build_verifier(loaded, vcfg, None, fuse)
    ids = torch.randint(0, rt.vocab_size, (K + 1,), device=rt.device, generator=None)
    rel = float("nan")
    if kernel:  # the same precision on the reference backend: the check before any timing
        ref = build_verifier(loaded, {**vcfg, "kernel": "reference"}, None, fuse)
        ref.reset(64)
        rt.reset(64)
        a, b = rt.forward(ids), ref.forward(ids)
        rel = float((a - b).norm() / b.norm())
        del ref
        torch.cuda.empty_cache()
    rt.enable_cuda_graphs(max_tokens=K + 1, max_len=512)
    rt.reset(rt.graphs.max_len)
    rt.graphs.capture_all()
    return rt, rel, time.perf_counter() - t0


def parse_configs(text: str | None) -> list[tuple]:
    """"precision:kernel:fused[:compiled[:attention]],..." (kernel - for none; precision may carry
    boolean verifier settings: int4+lm_head) -> Engines."""
    if not text:
        return CONFIGS
    yes = ("1", "true", "True")
    return [Engine(f[0], None if f[1] == "-" else f[1], f[2] in yes, len(f) > 3 and f[3] in yes,
                   len(f) > 4 and f[4] in yes) for f in (c.split(":") for c in text.split(","))]


def measure(loaded, engine: Engine, prompts, copy_bw) -> list[dict]:
    rt, rel, setup_s = build_engine(loaded, engine)
    times = {1: [], K + 1: []}
    for _ in range(REPS):
        for t in times:
            times[t].append(step_ms(rt, t))
    wb = weight_bytes(rt)
    base = dict(precision=engine.precision, kernel=engine.kernel or "-", fused=engine.fused, compiled=engine.compiled,
                attention=engine.attention, setup_s=setup_s,
                rel_err_vs_reference=rel,
                weight_bytes=wb)
    rows = []
    for t, v in times.items():
        s = pd.Series(v)
        med = s.median()
        rows.append(base | dict(measure=f"step_T{t}", ms=med, ms_p10=s.quantile(0.1), ms_p90=s.quantile(0.9),
                                tokens_per_s=1e3 / med if t == 1 else float("nan"),
                                gbps=wb / med / 1e6, frac_copy_bw=wb / med / 1e6 / copy_bw))
    for label, dcfg in (("e2e_ar", None), ("e2e_synthetic_a0.8_k5", {"name": "synthetic", "alpha": 0.8, "k": K,
                                                                      "acceptance": "forced"})):
        rows.append(base | dict(measure=label, **e2e(rt, prompts, dcfg)))
    rt.release()
    del rt
    torch.cuda.empty_cache()
    return rows


def markdown(df: pd.DataFrame, info: str) -> str:
    idx = ["precision", "kernel", "fused", "compiled", "attention"]
    steps = df[df.measure.str.startswith("step")].pivot_table(index=idx, columns="measure", values="ms", aggfunc="first")
    e = df[df.measure == "e2e_synthetic_a0.8_k5"].set_index(idx)
    ar = df[df.measure == "e2e_ar"].set_index(idx)
    # the bf16 reference on the same engine (fused / compiled / attention switches) and drafter
    same_engine = lambda key: e.loc[("reference", "-", *key[2:]), "tokens_per_s"] \
        if ("reference", "-", *key[2:]) in e.index else float("nan")  # noqa: E731
    lines = [f"# Verify-step speed, Qwen3-8B shapes, random bf16 weights\n\n{info}\n",
             "| precision | kernel | fused | compiled | fused attention | AR step T=1 ms | verify T=6 ms | AR tok/s (e2e) "
             "| synthetic a=0.8 k=5 tok/s | tau | x bf16, same engine and drafter | rel err vs reference backend "
             "| setup s |", "|" + "---|" * 13]
    for key, r in steps.iterrows():
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {key[4]} | {r.get('step_T1', float('nan')):.2f} | "
                     f"{r.get(f'step_T{K + 1}', float('nan')):.2f} | {ar.loc[key, 'tokens_per_s']:.0f} | "
                     f"{e.loc[key, 'tokens_per_s']:.0f} | {e.loc[key, 'tau']:.2f} | "
                     f"{e.loc[key, 'tokens_per_s'] / same_engine(key):.2f} | "
                     f"{e.loc[key, 'rel_err_vs_reference']:.1e} | {e.loc[key, 'setup_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/gpu")
    ap.add_argument("--max-seconds", type=float, default=420.0, help="stop starting new configurations after this")
    ap.add_argument("--configs", default=None,
                    help="comma-separated precision:kernel:fused[:compiled[:attention]] (kernel - for none), "
                         "e.g. reference:-:1:1:1")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.manual_seed(0)
    copy_bw = copy_bandwidth_gbps()
    loaded = random_qwen3()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 151936, (64,), generator=g).tolist() for _ in range(3)]
    info = (f"{torch.cuda.get_device_name()}, driver {driver_version()}, torch {torch.__version__}, "
            f"python {platform.python_version()}, copy bandwidth {copy_bw:.0f} GB/s; command: "
            f"`python experiments/step_speed.py {' '.join(argv or sys.argv[1:])}`")
    print(info, flush=True)
    rows = []
    chosen = parse_configs(args.configs)
    configs = chosen + [chosen[0] if chosen[0].precision == "reference" else Engine("reference", None, True, False)]  # drift
    for engine in configs:
        name = engine.label
        if time.perf_counter() - start > args.max_seconds:
            print(f"time budget spent: skipping {name}", flush=True)
            continue
        try:
            new = measure(loaded, engine, prompts, copy_bw)
        except Exception as e:  # noqa: BLE001 (one failing backend must not lose the others' rows)
            print(f"{name}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        for r in new:
            r.update(gpu=torch.cuda.get_device_name(), driver=driver_version(), torch=torch.__version__,
                     copy_gbps=copy_bw)
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()
                   if k in ("precision", "kernel", "fused", "compiled", "attention", "measure", "ms", "tokens_per_s", "tau",
                            "rel_err_vs_reference", "setup_s")}, flush=True)
        rows += new
    df = pd.DataFrame(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "step_speed.csv", index=False)
    try:
        md = markdown(df.drop_duplicates(["precision", "kernel", "fused", "compiled", "attention", "measure"]), info)
    except (KeyError, ValueError) as e:  # a configuration missing a measurement: the CSV has the rest
        md = f"{info}\n\n(table incomplete: {type(e).__name__} {e}); see step_speed.csv\n"
    ref = df[(df.precision == "reference") & df.fused & ~df.compiled & df.measure.str.startswith("step")]
    if len(ref) > 2:  # measured first and last: the drift over the run
        md += "\nDrift control (bf16 reference, fused, first vs last): " + ", ".join(
            f"{m} {g.ms.iloc[0]:.2f} -> {g.ms.iloc[-1]:.2f} ms" for m, g in ref.groupby("measure")) + "\n"
    (out / "step_speed.md").write_text(md)
    print((out / "step_speed.md").read_text())
    try:
        print(subprocess.run(["nvidia-smi", "--query-gpu=name,clocks.sm,clocks.mem,power.draw", "--format=csv"],
                             capture_output=True, text=True).stdout)
    except OSError:
        pass


if __name__ == "__main__":
    main()
