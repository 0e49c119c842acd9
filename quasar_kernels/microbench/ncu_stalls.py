"""Stall samples of one kernel launch per SASS line, summed by reason and by address range, from Nsight
Compute's source page (`ncu --import X.ncu-rep --page source --csv --print-source sass > X.csv`; .csv.gz
read too):

    python -m quasar_kernels.microbench.ncu_stalls results/gpu/run11/base_64_sass.csv.gz \\
        --regions frame:53f00:53fa0,loader:53fb0:544a0,compute:54680:551d0 [--top 30]

A region is name:first:last, addresses as the CSV's last five hex digits (the kernel's own offsets
differ per build: find the stage loop's BAR.SYNC and back-branch first). Samples outside every region
are 'other' (prologue, block epilogue). Prints each region's share of samples, warp instructions per
warp (the launch's warps = executions of its first instruction) and top stall reasons."""
import argparse
import collections
import csv
import gzip


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
    args = ap.parse_args(argv)
    hdr, rows = read(args.csv)
    ix = {h: i for i, h in enumerate(hdr)}
    reasons = [h for h in hdr if h.startswith("stall_") and "(Not Issued)" not in h]
    regions = [r.split(":") for r in args.regions.split(",") if r]
    warps = int(rows[0][ix["Instructions Executed"]])  # the first instruction runs once per warp
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


if __name__ == "__main__":
    main()
