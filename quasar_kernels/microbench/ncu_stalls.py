"""Stall samples of one kernel launch per SASS line, summed by reason and by address range, from Nsight
Compute's source page (`ncu --import X.ncu-rep --page source --csv --print-source sass > X.csv`; .csv.gz
read too):

    python -m quasar_kernels.microbench.ncu_stalls results/gpu/run11/base_64_sass.csv.gz \\
        --regions frame:53f00:53fa0,loader:53fb0:544a0,compute:54680:551d0 [--top 30]

A region is name:first:last, addresses as the CSV's last five hex digits (the kernel's own offsets
differ per build: find the stage loop's BAR.SYNC and back-branch first). Samples outside every region
are 'other' (prologue, block epilogue). Prints each region's share of samples, warp instructions per
warp (the launch's warps = executions of its first instruction) and top stall reasons.

`--by-opcode` instead groups the lines by what they do, whatever the build's addresses (the classes
in OPCODE_CLASSES: the dequantization's ALU ops, the wgmma and its fences / waits, shared-memory
loads, cp.async and its waits, barriers, integer and address work, the rest by opcode), and
`--steps N` (the warp's k16 steps) adds instructions per step: what a warp issues per MMA."""
import argparse
import collections
import csv
import gzip
import re

# (class, opcode pattern), first match wins; a predicate guard (@P0, @!UP1) is stripped first. The
# dequantization's opcodes are also used for other work: a LOP3 that writes a predicate (bit tests of
# the loader's masks) and an arithmetic shift (sign extension of an index) count as integer work.
OPCODE_CLASSES = [("wgmma", r"HGMMA"), ("wgmma fence / wait", r"WARPGROUP\."),
                  ("integer / address", r"(LOP3\.LUT\s+P\d|SHF\.[LR]\.S)"),
                  ("dequantize (ALU)", r"(LOP3|SHF|HADD2|HMUL2|HFMA2|PRMT)\b"), ("shared load", r"LDS"),
                  ("cp.async", r"LDGSTS"), ("cp.async wait", r"(LDGDEPBAR|DEPBAR)\b"), ("barrier", r"BAR\."),
                  ("fence", r"(MEMBAR|FENCE|ERRBAR)"),
                  ("integer / address", r"(U?IADD|U?IMAD|ISETP|UISETP|U?LEA|U?SEL|U?MOV|R2UR|ULDC|LDC|S2R|S2UR|CS2R|VIADD|"
                                        r"VIMNMX|IABS|ULOP3|USHF|PLOP3|P2R|R2P|SHFL|BRA|BSYNC|BSSY|WARPSYNC|NOP|IADD3)")]


def opcode_class(source: str) -> str:
    op = re.sub(r"^@!?U?P\w+\s+", "", source.strip())
    return next((name for name, pat in OPCODE_CLASSES if re.match(pat, op)), "other: " + (op.split() or ["?"])[0])


def read(path):
    with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
        rows = list(csv.reader(f))
    hdr = rows[1]
    return hdr, [r for r in rows[2:] if len(r) >= len(hdr)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("csv")
    ap.add_argument("--regions", default="")
    ap.add_argument("--top", type=int, default=0, help="also list the N lines with the most samples")
    ap.add_argument("--by-opcode", action="store_true", help="group lines by opcode class, not by address")
    ap.add_argument("--steps", type=int, default=0, help="k16 steps per warp: also print instructions per step")
    args = ap.parse_args(argv)
    hdr, rows = read(args.csv)
    ix = {h: i for i, h in enumerate(hdr)}
    reasons = [h for h in hdr if h.startswith("stall_") and "(Not Issued)" not in h]
    regions = [r.split(":") for r in args.regions.split(",") if r]
    warps = int(rows[0][ix["Instructions Executed"]])  # the first instruction runs once per warp
    if args.by_opcode:
        by_opcode(rows, ix, reasons, warps, args.steps)
        return
    samples, instr = collections.Counter(), collections.Counter()
    by_reason = collections.defaultdict(collections.Counter)
    lines = []
    for r in rows:
        a = int(r[ix["Address"]][-5:], 16)
        s = int(r[ix["Warp Stall Sampling (All Samples)"]] or 0)
        name = next((n for n, lo, hi in regions if int(lo, 16) <= a <= int(hi, 16)), "other")
        samples[name] += s
        instr[name] += int(r[ix["Instructions Executed"]] or 0)
        for h in reasons:
            by_reason[name][h] += int(r[ix[h]] or 0)
            by_reason["all"][h] += int(r[ix[h]] or 0)
        lines.append((s, r[ix["Address"]][-5:], r[ix["Source"]].strip()[:70], {h: int(r[ix[h]] or 0) for h in reasons}))
    total = sum(samples.values())
    print(f"{total} samples, {warps} warps")
    for name in [n for n, _, _ in regions] + ["other", "all"]:
        s = total if name == "all" else samples[name]
        if not s:
            continue
        top = ", ".join(f"{k[6:]} {100 * v / s:.0f}%" for k, v in by_reason[name].most_common(6) if v)
        share = "" if name == "all" else f"{100 * s / total:5.1f}% of samples, {instr[name] / warps:7.0f} instr/warp: "
        print(f"{name:8s} {share}{top}")
    for s, a, src, d in sorted(lines, reverse=True)[:args.top]:
        top = " ".join(f"{k[6:]}={v}" for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:3] if v)
        print(f"{100 * s / total:5.1f}% {a} {src:70s} {top}")


def by_opcode(rows, ix, reasons, warps, steps):
    samples, instr = collections.Counter(), collections.Counter()
    by_reason = collections.defaultdict(collections.Counter)
    for r in rows:
        c = opcode_class(r[ix["Source"]])
        samples[c] += int(r[ix["Warp Stall Sampling (All Samples)"]] or 0)
        instr[c] += int(r[ix["Instructions Executed"]] or 0)
        for h in reasons:
            by_reason[c][h] += int(r[ix[h]] or 0)
    total = sum(samples.values()) or 1
    print(f"{total} samples, {warps} warps, {sum(instr.values()) / warps:.0f} instr/warp"
          + (f", {sum(instr.values()) / warps / steps:.1f} per k16 step" if steps else ""))
    for c, s in sorted(samples.items(), key=lambda kv: (-kv[1], kv[0])):
        top = ", ".join(f"{k[6:]} {100 * v / s:.0f}%" for k, v in by_reason[c].most_common(4) if v) if s else ""
        per = f" {instr[c] / warps / steps:5.2f}/step" if steps else ""
        print(f"{c:22s} {100 * s / total:5.1f}% of samples {instr[c] / warps:8.1f} instr/warp{per}  {top}")


if __name__ == "__main__":
    main()
