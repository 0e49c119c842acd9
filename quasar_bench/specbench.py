"""Spec-Bench interop: a run's rows as Spec-Bench answer files, and Spec-Bench's speedup table.

    python -m quasar_bench.specbench export RUN_DIR OUT_DIR [--wall-time total|decode]
    python -m quasar_bench.specbench import --base BASE.jsonl METHOD.jsonl [...] [--tokenizer DIR] [--out T.csv]

The format is Spec-Bench's (github.com/hemingkx/Spec-Bench, evaluation/eval.py `get_model_answers`):
one JSON object a line per question, `question_id`, `category`, `answer_id`, `model_id`, `tstamp` and
`choices: [{index, turns, decoding_steps, new_tokens, wall_time, accept_lengths}]`, where `turns`,
`decoding_steps`, `new_tokens` and `wall_time` hold one entry per turn (the answer text, the verify
steps, the generated tokens, the seconds of the timed generate call, prefill included) and
`accept_lengths` is one flat list over all turns of the tokens each verify step produced (accepted
drafts + 1; an AR baseline's are all 1).

Spec-Bench's evaluation/speed.py reads `choices[0]` only. Per question, speed = Σ new_tokens / Σ
wall_time (the baseline's tokens re-counted by tokenizing its answer text: len(ids) - 1 per turn);
tokens/s is the mean of those speeds over a category's questions (not a pooled ratio), the speedup
is the method's mean over the baseline's mean, and the mean accepted length pools every step of
every question. `import` computes the same, paired on question_id (speed.py pairs nothing: it
assumes both files answer the same questions).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from .data import read_jsonl
from .errors import QuasarError
from .fileio import atomic_write_text
from .rowfiles import read_rows
from .summary import is_baseline

WALL_TIMES = ("total", "decode")
NEEDED = ["cell_id", "model", "verifier", "drafter", "category", "prompt_id", "turn", "new_tokens",
          "verify_steps", "accepted_lengths", "decode_s", "output_text"]
# speed.py's "mt_bench" group: MT-Bench's eight categories (the other Spec-Bench tasks are one category each)
MT_BENCH = ["writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"]


# -- export ----------------------------------------------------------------------------------------
def step_lengths(row) -> list[int]:
    """Tokens produced per verify step (accepted drafts + 1), the last step cut to the tokens kept:
    a step whose accepted drafts held the EOS keeps only the tokens up to it (Spec-Bench cuts its
    last accept length the same way), so the lengths sum to new_tokens."""
    where = f"cell {row['cell_id']} prompt {row['prompt_id']} turn {row['turn']}"
    acc = row["accepted_lengths"]
    if not isinstance(acc, (list, tuple, np.ndarray)):
        raise QuasarError(f"{where}: the row has no per-step accepted lengths (recorded before the harness "
                          "stored them); re-run that cell to export it")
    lengths = [int(a) + 1 for a in acc]
    steps, new = int(row["verify_steps"]), int(row["new_tokens"])
    excess = sum(lengths) - new
    if len(lengths) != steps or not lengths or not 0 <= excess < lengths[-1]:
        raise QuasarError(f"{where}: {len(lengths)} accepted lengths over {steps} verify steps give "
                          f"{sum(lengths)} tokens, not its {new} new tokens: a damaged row; "
                          "re-run that cell into a fresh out_dir")
    lengths[-1] -= excess
    return lengths


def question_id(prompt_id: str):
    """Spec-Bench's question ids are integers; ours are their text (builtin ids stay text)."""
    return int(prompt_id) if str(prompt_id).isdigit() else str(prompt_id)


def answer_lines(cell: pd.DataFrame, model_id: str, wall_time: str, tstamp: float) -> list[dict]:
    """One Spec-Bench answer per prompt of one cell's rows (turns in order)."""
    out = []
    for pid, q in cell.groupby("prompt_id", sort=False):
        q = q.sort_values("turn")
        turns = [int(t) for t in q["turn"]]
        if turns != list(range(1, len(turns) + 1)):
            raise QuasarError(f"cell {q['cell_id'].iloc[0]} prompt {pid} holds turns {turns}, not 1..n: "
                              "an interrupted run; re-run its command to finish it")
        seconds = q["decode_s"] + (q["prefill_s"] if wall_time == "total" else 0.0)
        out.append({"question_id": question_id(pid), "category": str(q["category"].iloc[0]),
                    "answer_id": f"{q['cell_id'].iloc[0]}/{pid}", "model_id": model_id,
                    "choices": [{"index": 0, "turns": [str(t) for t in q["output_text"]],
                                 "decoding_steps": [int(s) for s in q["verify_steps"]],
                                 "new_tokens": [int(n) for n in q["new_tokens"]],
                                 "wall_time": [float(s) for s in seconds],
                                 "accept_lengths": [n for _, r in q.iterrows() for n in step_lengths(r)]}],
                    "tstamp": tstamp})
    return sorted(out, key=lambda a: (isinstance(a["question_id"], str), a["question_id"]))


def _part(value) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(value)).strip("_") or "x"


def file_names(df: pd.DataFrame) -> dict[str, str]:
    """cell_id -> `<model>-<verifier>-<drafter>[-k<k>]-temp-<T>[-b<B>]`; cells that would share a
    name (other drafter settings, dataset, ...) get their cell id before the batch suffix."""
    first = df.drop_duplicates("cell_id").set_index("cell_id")
    base = is_baseline(first)
    stem, suffix = {}, {}
    for cid, r in first.iterrows():
        parts = [r["model"], r["verifier"], r["drafter"]]
        if not base[cid] and "k" in first:
            parts.append(f"k{int(r['k'])}")
        parts += ["temp", float(r["temperature"]) if "temperature" in first else 0.0]
        stem[cid] = "-".join(_part(p) for p in parts)
        b = int(r["batch_size"]) if "batch_size" in first and r["batch_size"] == r["batch_size"] else 1
        suffix[cid] = f"-b{b}" if b > 1 else ""
    names = {cid: stem[cid] + suffix[cid] for cid in stem}
    clash = {n for n in names.values() if list(names.values()).count(n) > 1}
    return {cid: stem[cid] + (f"-{cid}" if n in clash else "") + suffix[cid] for cid, n in names.items()}


def export(run_dir, out_dir, wall_time: str = "total") -> list[tuple[Path, int]]:
    """Write one Spec-Bench answer file per cell of the run at run_dir into out_dir, or, when the
    run timed its prompts several times (`repeat`), one per cell and repeat r into
    out_dir/run_<r+1>/ (the layout of Spec-Bench's runs for speed.py --mean-report); every file is
    built (and every row checked) before the first is written. Returns (file, questions) pairs."""
    if wall_time not in WALL_TIMES:
        raise QuasarError(f"--wall-time {wall_time!r}: choose one of {', '.join(WALL_TIMES)}")
    df = read_rows(run_dir)
    if df.empty:
        raise QuasarError(f"{run_dir} holds no rows; run the experiment first (its out_dir holds the rows)")
    missing = [c for c in NEEDED + (["prefill_s"] if wall_time == "total" else []) if c not in df]
    if missing:
        raise QuasarError(f"the rows of {run_dir} have no {', '.join(missing)} column(s), which Spec-Bench's "
                          "format needs (rows recorded before the harness stored them); re-run the experiment")
    repeat = pd.to_numeric(df["repeat"], errors="coerce").fillna(0).astype(int) if "repeat" in df else 0
    df = df.assign(prompt_id=df["prompt_id"].astype(str), repeat=repeat)
    # a prompt's turn count is the most turns any cell stored for it: fewer is an interrupted cell
    key = ["dataset", "prompt_id"] if "dataset" in df else ["prompt_id"]
    most = df.groupby(key)["turn"].transform("max")
    short = df.groupby(["cell_id", "repeat"] + key)["turn"].transform("max") < most
    if short.any():
        r = df[short].iloc[0]
        raise QuasarError(f"cell {r['cell_id']} ({r['verifier']}/{r['drafter']}) lacks later turns of prompt "
                          f"{r['prompt_id']} that other cells hold: an interrupted run; re-run its command to finish it")
    names, tstamp = file_names(df), time.time()
    out = Path(out_dir).expanduser()
    several = df["repeat"].nunique() > 1
    files = {(out / f"run_{r + 1}" if several else out) / f"{names[cid]}.jsonl":
             answer_lines(cell, names[cid], wall_time, tstamp)
             for (r, cid), cell in df.groupby(["repeat", "cell_id"], sort=False)}
    try:
        written = []
        for path in sorted(files):
            path.parent.mkdir(parents=True, exist_ok=True)
            text = "".join(json.dumps(a) + "\n" for a in files[path])
            written.append((atomic_write_text(path, text), len(files[path])))
    except OSError as e:
        raise QuasarError(f"cannot write to {out} ({e.strerror or e}); pick a writable OUT_DIR") from None
    return written


# -- import ----------------------------------------------------------------------------------------
def _numbers(v, n=None) -> bool:
    ok = isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                     and math.isfinite(x) and x >= 0 for x in v)
    return ok and (n is None or len(v) == n)


def read_answers(path, accept_lengths: bool) -> dict:
    """question_id -> (category, choices[0]) of a Spec-Bench answer file, each line checked for
    what speed.py reads (its first choice's turns, new_tokens, wall_time and, with `accept_lengths`,
    accept_lengths)."""
    out, first = {}, {}
    for where, rec in read_jsonl(path, "answer", "check the path"):
        for key in ("question_id", "category", "choices"):
            if key not in rec:
                raise QuasarError(f"{where}: missing key {key!r}; a Spec-Bench answer line needs question_id, "
                                  "category and choices")
        choices = rec["choices"]
        if not (isinstance(choices, list) and choices and isinstance(choices[0], dict)):
            raise QuasarError(f"{where}: 'choices' must be a non-empty list of objects")
        c = choices[0]
        turns = c.get("turns")
        if not (isinstance(turns, list) and turns and all(isinstance(t, str) for t in turns)):
            raise QuasarError(f"{where}: choices[0].turns must be a non-empty list of strings")
        for key in ("new_tokens", "wall_time"):
            if not _numbers(c.get(key), len(turns)):
                raise QuasarError(f"{where}: choices[0].{key} must be a list of {len(turns)} non-negative "
                                  "numbers, one per turn")
        if sum(c["wall_time"]) <= 0:
            raise QuasarError(f"{where}: choices[0].wall_time sums to 0 s; no speed can be computed")
        if accept_lengths and not (_numbers(c.get("accept_lengths")) and c["accept_lengths"]):
            raise QuasarError(f"{where}: choices[0].accept_lengths must be a non-empty list of numbers "
                              "(tokens per verify step)")
        qid = rec["question_id"]
        if not isinstance(qid, (int, str)) or isinstance(qid, bool):
            raise QuasarError(f"{where}: question_id must be an integer or a string")
        if qid in out:
            raise QuasarError(f"{where}: question_id {qid!r} again (first at {first[qid]}); keep one answer "
                              "per question (Spec-Bench's reorg_answer_file keeps the last)")
        out[qid], first[qid] = (str(rec["category"]), c), where
    if not out:
        raise QuasarError(f"{path} holds no answers; pass a Spec-Bench answer .jsonl file")
    return out


def base_token_counter(tokenizer_dir):
    """Tokens of a baseline answer, counted as speed.py does with a tokenizer (len(ids) - 1 per
    turn: it drops one BOS), else the file's own new_tokens."""
    if tokenizer_dir is None:
        return lambda c: sum(c["new_tokens"])
    if not Path(tokenizer_dir).expanduser().is_dir():
        raise QuasarError(f"--tokenizer {tokenizer_dir}: no such folder; pass a local tokenizer folder")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(Path(tokenizer_dir).expanduser()), local_files_only=True)
    except (OSError, ValueError) as e:
        raise QuasarError(f"--tokenizer {tokenizer_dir}: no tokenizer there ({str(e).splitlines()[0][:80]})") from None
    return lambda c: sum(len(tok(t).input_ids) - 1 for t in c["turns"])


def groups(categories: list[str]) -> list[tuple[str, set]]:
    """(name, categories) rows of the table: each category, speed.py's mt_bench group when any of
    its categories is present, then overall."""
    present = list(dict.fromkeys(categories))
    out = [(c, {c}) for c in present]
    if any(c in MT_BENCH for c in present):
        out.append(("mt_bench", set(MT_BENCH)))
    return out + [("overall", set(present))]


def speedup_table(base_path, method_paths, tokenizer_dir=None) -> tuple[pd.DataFrame, list[str]]:
    """Spec-Bench's speed.py table for every method file against the base file, paired on
    question_id, and one note per method on the pairing."""
    base = read_answers(base_path, accept_lengths=False)
    base_tokens = base_token_counter(tokenizer_dir)
    rows, notes = [], []
    for path in method_paths:
        method = read_answers(path, accept_lengths=True)
        paired = [q for q in method if q in base]
        if not paired:
            raise QuasarError(f"{path} and {base_path} share no question_id; pass answers to the same questions")
        bad = [q for q in paired if method[q][0] != base[q][0]]
        if bad:
            raise QuasarError(f"question_id {bad[0]!r} is {method[bad[0]][0]!r} in {path} but {base[bad[0]][0]!r} "
                              f"in {base_path}: not the same question set")
        notes.append(f"{Path(path).name}: paired on {len(paired)} question_ids"
                     + (f"; left out {len(method) - len(paired)} only in it and {len(base) - len(paired)} only "
                        "in the base" if len(paired) < max(len(method), len(base)) else ""))
        for name, cats in groups([method[q][0] for q in paired]):
            qs = [q for q in paired if method[q][0] in cats]
            speed = [sum(method[q][1]["new_tokens"]) / sum(method[q][1]["wall_time"]) for q in qs]
            speed0 = [base_tokens(base[q][1]) / sum(base[q][1]["wall_time"]) for q in qs]
            steps = [a for q in qs for a in method[q][1]["accept_lengths"]]
            rows.append({"method": Path(path).stem, "category": name, "n": len(qs),
                         "accept_length": float(np.mean(steps)), "tokens_per_s": float(np.mean(speed)),
                         "base_tokens_per_s": float(np.mean(speed0)),
                         "speedup": float(np.mean(speed) / np.mean(speed0))})
    return pd.DataFrame(rows), notes


def format_table(table: pd.DataFrame) -> str:
    head = f"{'method':<40} {'category':<16} {'n':>4} {'accept len':>10} {'tok/s':>10} {'base tok/s':>10} {'speedup':>8}"
    lines = [head, "-" * len(head)]
    for r in table.itertuples(index=False):
        lines.append(f"{r.method[:40]:<40} {r.category[:16]:<16} {r.n:>4} {r.accept_length:>10.2f} "
                     f"{r.tokens_per_s:>10.1f} {r.base_tokens_per_s:>10.1f} {r.speedup:>8.2f}")
    return "\n".join(lines)


# -- command line ----------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other bad input (argparse prints the usage too)
        raise QuasarError(f"{message}; see python -m quasar_bench.specbench {{export,import}} --help")


def parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="python -m quasar_bench.specbench",
                                 description="Export a run as Spec-Bench answer files; compute Spec-Bench's "
                                             "speedup table over answer files.")
    sub = ap.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="one Spec-Bench answer .jsonl per cell of a run (per repeat: run_<r+1>/)")
    ex.add_argument("run_dir", help="a run's out_dir (its rows)")
    ex.add_argument("out_dir", help="where the answer files go")
    ex.add_argument("--wall-time", choices=WALL_TIMES, default="total",
                    help="total: prefill + decode, what Spec-Bench times (default); decode: decode only, "
                         "what this harness's tokens/s divides by")
    im = sub.add_parser("import", help="Spec-Bench's speedup table: METHOD files against a BASE file")
    im.add_argument("--base", required=True, help="the baseline's answer file (e.g. vanilla AR)")
    im.add_argument("methods", nargs="+", help="answer files of the methods")
    im.add_argument("--tokenizer", help="count the baseline's tokens from its text as speed.py does "
                                        "(len(ids) - 1 per turn) with this local tokenizer folder")
    im.add_argument("--out", help="also write the table to this .csv file")
    return ap


def main(argv=None) -> int:
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:  # --help
        return 2 if e.code else 0
    except QuasarError as e:
        print(f"quasar_bench.specbench: error: {e}", file=sys.stderr)
        return 2
    try:
        if args.command == "export":
            for path, n in export(args.run_dir, args.out_dir, args.wall_time):
                print(f"{path}  ({n} questions)")
            return 0
        table, notes = speedup_table(args.base, args.methods, args.tokenizer)
        print("\n".join(notes + [format_table(table)]))
        if args.out:
            try:
                atomic_write_text(args.out, table.to_csv(index=False))
            except OSError as e:
                raise QuasarError(f"--out {args.out}: cannot write it ({e.strerror or e})") from None
        return 0
    except QuasarError as e:
        print(f"quasar_bench.specbench: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
