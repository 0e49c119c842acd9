"""CPU tests of the kernel microbenchmarks' host-side arithmetic (their GPU parts run on the device)."""
import pytest

from quasar_kernels.microbench.wgmma_ablate import cta_times_summary


def test_cta_times_summary_merges_each_sms_intervals():
    # SM 0: two overlapping CTAs [0, 10] and [5, 20] -> resident 20 ns; SM 1: [2, 8] -> 6 ns;
    # SM 2: two disjoint CTAs [0, 3] and [10, 12] -> 5 ns; a fourth SM ran nothing.
    # span 20 ns, so busy = (20 + 6 + 5) / (4 x 20) by hand.
    rows = [(5, 20, 0), (0, 10, 0), (2, 8, 1), (10, 12, 2), (0, 3, 2)]
    s = cta_times_summary(rows, n_sms=4)
    assert s["span_us"] == pytest.approx(0.020)
    assert s["sm_busy"] == pytest.approx(31 / 80)
    assert s["last_start_us"] == pytest.approx(0.010)
    assert s["first_end_us"] == pytest.approx(0.003)
    assert s["median_end_us"] == pytest.approx(0.010)  # ends 3, 8, 10, 12, 20
    assert s["tick_ns"] == 1  # stamps 0, 2, 3, 5, 8, 10, 12, 20: the closest pair is 1 ns apart


def test_cta_times_summary_counts_an_sm_once_when_its_ctas_nest():
    # a CTA inside another's interval on the same SM adds nothing; offsets from the first start
    rows = [(1000, 2000, 7), (1200, 1500, 7)]
    s = cta_times_summary(rows, n_sms=1)
    assert s["sm_busy"] == pytest.approx(1.0)
    assert s["span_us"] == pytest.approx(1.0)


def test_ablate_refuses_two_modes_at_once(capsys):
    # --profile and --times each build one variant and run it differently: asking for both used to run
    # the profile silently and drop --times
    from quasar_kernels.microbench.wgmma_ablate import main

    with pytest.raises(SystemExit) as e:
        main(["--profile", "base", "--times", "base"])
    assert e.value.code == 2
    assert "not allowed with" in capsys.readouterr().err


def test_every_ablation_variant_sets_macros_the_kernel_reads():
    # a variant whose macro the kernel source never tests builds the shipped kernel under another
    # name, and its timings would then be read as a measured effect
    import re
    from pathlib import Path

    from quasar_kernels.microbench import wgmma_ablate as wa

    src = (Path(wa.__file__).parents[1] / "csrc" / "w4a16_wgmma.cu").read_text()
    read = set(re.findall(r"(?:#ifdef|#ifndef|defined\()\s*(QB_\w+)", src))  # every switch is #ifndef'd to a default
    for name, flags in wa.VARIANTS.items():
        for f in flags:
            macro = re.match(r"-D(QB_\w+)", f).group(1)
            assert macro in read, f"variant {name}: {macro} is never tested in w4a16_wgmma.cu"
    assert set(wa.EXACT) <= set(wa.VARIANTS)


def test_ncu_stalls_by_opcode_groups_guarded_lines_and_counts_per_step(tmp_path, capsys):
    """--by-opcode strips predicate guards before classifying (a guarded cp.async is a cp.async, not
    'other'), counts a LOP3 that writes a predicate and an arithmetic shift as integer work, not
    dequantization, sums samples and executed instructions per class, and --steps divides by the
    warp's k16 steps: 2 warps, 4 steps each."""
    import csv

    from quasar_kernels.microbench import ncu_stalls

    hdr = ["Address", "Source", "Warp Stall Sampling (All Samples)", "Instructions Executed", "stall_wait",
           "stall_math", "stall_wait (Not Issued)"]
    lines = [("0x10", "S2R R0, SR_TID.X", 1, 2, 1, 0), ("0x20", "LOP3.LUT R1, R2, 0xf000f, R3, 0xea, !PT", 6, 16, 2, 4),
             ("0x30", "@P0 LDGSTS.E.BYPASS.128 [R4], desc[UR4][R6.64]", 3, 8, 3, 0),
             ("0x40", "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24", 2, 8, 2, 0), ("0x50", "FADD.FTZ R1, R1, R2", 0, 2, 0, 0),
             ("0x60", "LOP3.LUT P2, R59, R70, 0x2, RZ, 0xc0, !PT", 1, 2, 1, 0), ("0x70", "SHF.R.S32.HI R71, RZ, 0x1f, R23", 0, 2, 0, 0)]
    p = tmp_path / "x.csv"
    with open(p, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Kernel Name", "k"])
        w.writerow(hdr)
        for a, src, s, n, wt, m in lines:
            w.writerow([a, src, s, n, wt, m, 0])
    ncu_stalls.main([str(p), "--by-opcode", "--steps", "4"])
    out = capsys.readouterr().out
    assert out.startswith("13 samples, 2 warps, 20 instr/warp, 5.0 per k16 step")
    row = {ln[:22].strip(): ln for ln in out.splitlines()[1:]}
    assert "46.2% of samples" in row["dequantize (ALU)"] and "8.0 instr/warp  2.00/step" in row["dequantize (ALU)"]
    assert "math 67%, wait 33%" in row["dequantize (ALU)"]
    assert "23.1% of samples" in row["cp.async"] and "1.00/step" in row["cp.async"]
    assert "1.00/step" in row["wgmma"]
    assert "15.4% of samples" in row["integer / address"] and "3.0 instr/warp  0.75/step" in row["integer / address"]
    assert "other: FADD.FTZ" in row
