"""Prompt sets: the shipped `builtin` set, and Spec-Bench / MT-Bench question.jsonl files.

Every set loads as a list of `Prompt` (one or two user turns). The jsonl format is FastChat's:
one JSON object a line, `{"question_id": int, "category": str, "turns": [str, ...]}`.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from quasar_bench.errors import QuasarError, unknown
from quasar_bench.fileio import atomic_write_bytes, cache_root

DATASETS = ("builtin", "spec_bench", "mt_bench")
# Public sources, fetched once (dataset.path=null) into <cache>/data/<name>/question.jsonl: each
# pinned to a commit of its repository and to the sha256 of the file at that commit, so every
# machine evaluates the same questions and a changed or damaged download is refused.
@dataclass(frozen=True)
class Source:
    repo: str
    commit: str
    path: str
    sha256: str

    @property
    def url(self) -> str:
        return f"https://raw.githubusercontent.com/{self.repo}/{self.commit}/{self.path}"


SOURCES = {
    "spec_bench": Source("hemingkx/Spec-Bench", "fd2c1cd7d2201ef71db4c5f4e455008f017967bf",
                         "data/spec_bench/question.jsonl",
                         "4b6d33e79484f9841c487ee87d1cf6aa8c6066f61d5d482ff09e5a007fafdf04"),
    "mt_bench": Source("lm-sys/FastChat", "0e6d3e4beaab66f4d3f93db72541a4abab8af28d",
                       "fastchat/llm_judge/data/mt_bench/question.jsonl",
                       "119565adbab82227089cefdb44c8d7e2cf04dc0a0ec233634c82e7d4e2a944f7"),
}
FETCH_TIMEOUT_S = 10


@dataclass
class Prompt:
    dataset: str
    category: str
    prompt_id: str
    turns: list[str]


def jsonl_records(lines: list[str], source: str) -> list[tuple[str, dict]]:
    """(where, object) for every non-blank line of a jsonl text; `where` is `<source> line N`, the
    prefix of every error about that line. A line that is not one JSON object is a QuasarError."""
    out = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{source} line {lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise QuasarError(f"{where}: bad JSON ({e.msg}); fix or remove that line") from None
        if not isinstance(rec, dict):
            raise QuasarError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        out.append((where, rec))
    return out


def read_jsonl(path, what: str, fix: str) -> list[tuple[str, dict]]:
    """jsonl_records of the file at `path`; an unreadable file is a QuasarError naming `what` it
    was and `fix` (the setting or argument that named it)."""
    p = Path(path).expanduser()
    try:
        text = p.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise QuasarError(f"cannot read {what} file {p} ({e.__class__.__name__}); {fix}") from None
    return jsonl_records(text.splitlines(), str(p))


def _parse_lines(lines: list[str], source: str, dataset: str, id_key: str) -> list[Prompt]:
    return _prompts(jsonl_records(lines, source), dataset, id_key)


def _prompts(records: list[tuple[str, dict]], dataset: str, id_key: str) -> list[Prompt]:
    prompts, seen = [], set()
    for where, rec in records:
        for key in (id_key, "category", "turns"):
            if key not in rec:
                raise QuasarError(f"{where}: missing key {key!r}; each line needs "
                                  f"{id_key!r}, 'category' and 'turns'")
        turns = rec["turns"]
        if not (isinstance(turns, list) and turns and all(isinstance(t, str) for t in turns)):
            raise QuasarError(f"{where}: 'turns' must be a non-empty list of strings")
        if not isinstance(rec["category"], str) or not rec["category"]:
            raise QuasarError(f"{where}: 'category' must be a non-empty string")
        pid = str(rec[id_key])
        if pid in seen:
            raise QuasarError(f"{where}: duplicate {id_key} {pid}; ids must be unique")
        seen.add(pid)
        prompts.append(Prompt(dataset, rec["category"], pid, list(turns)))
    return prompts


def package_prompts(filename: str, dataset: str) -> list[Prompt]:
    """A prompt file shipped in quasar_bench/prompts/ (`prompt_id`, `category`, `turns` a line)."""
    text = resources.files("quasar_bench").joinpath(f"prompts/{filename}").read_text("utf-8")
    return _parse_lines(text.splitlines(), f"quasar_bench/prompts/{filename}", dataset, "prompt_id")


def _read_builtin() -> list[Prompt]:
    return package_prompts("builtin.jsonl", "builtin")


def data_cache_dir() -> Path:
    """<$QUASAR_CACHE or ~/.cache/quasar_bench>/data"""
    return cache_root() / "data"


def _download(url: str, timeout: float) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 (fixed https URLs)
        return r.read()


def _sha256(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def fetch_dataset(name: str) -> Path:
    """The cached question.jsonl of `name`, fetched once from its pinned source.

    Offline (no network, or QUASAR_OFFLINE=1 / HF_HUB_OFFLINE=1): a QuasarError naming dataset.path=.
    Only a file whose sha256 is the pinned one is cached or read back from the cache."""
    src = SOURCES[name]
    target = data_cache_dir() / name / "question.jsonl"
    if target.exists() and _sha256(target.read_bytes()) == src.sha256:
        return target  # a cached file that no longer matches is fetched again
    hint = f"pass dataset.path=/path/to/question.jsonl (a local copy of {src.url})"
    if os.environ.get("QUASAR_OFFLINE", "0") not in ("", "0") or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        raise QuasarError(f"dataset {name!r} is not cached in {target.parent} and offline mode is set; {hint}")
    try:
        body = _download(src.url, FETCH_TIMEOUT_S)
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise QuasarError(f"cannot fetch dataset {name!r} ({str(reason).splitlines()[0][:120]}; offline?); "
                          f"{hint}") from None
    if _sha256(body) != src.sha256:
        raise QuasarError(f"the download of dataset {name!r} from {src.url} has sha256 {_sha256(body)[:12]}…, not the "
                          f"pinned {src.sha256[:12]}… (a proxy or error page?); nothing cached; {hint}")
    atomic_write_bytes(target, body)
    return target


def _read_jsonl(name: str, path: str | None) -> list[Prompt]:
    if not path:
        if name not in SOURCES:
            raise QuasarError(f"dataset {name!r} is read from a question.jsonl file: "
                              f"set dataset.path=/path/to/question.jsonl")
        path = str(fetch_dataset(name))
    return _prompts(read_jsonl(path, name, "check dataset.path="), name, "question_id")


def load_prompts(name: str, path: str | None = None, categories: list[str] | None = None,
                 limit: int | None = None, per_category: int | None = None, seed: int = 0) -> list[Prompt]:
    """Load a prompt set and keep `categories` (in file order); then either take the first `limit`,
    or `per_category` prompts of each kept category, drawn by a shuffle seeded with `seed` and the
    category name and returned in file order (a category with fewer prompts gives all it has)."""
    if name not in DATASETS:
        raise unknown("dataset", name, DATASETS)
    for key, value in (("limit", limit), ("per_category", per_category)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise QuasarError(f"dataset.{key}={value!r} must be a positive integer (or null for all)")
    if limit is not None and per_category is not None:
        raise QuasarError(f"dataset.limit={limit} and dataset.per_category={per_category} contradict each other "
                          "(the first N prompts vs N of each category); set one of them to null")
    prompts = _read_builtin() if name == "builtin" else _read_jsonl(name, path)
    if categories:
        if isinstance(categories, str):
            categories = [categories]
        available = sorted({p.category for p in prompts})
        missing = [c for c in categories if c not in available]
        if missing:
            raise QuasarError(f"unknown categor{'y' if len(missing) == 1 else 'ies'} "
                              f"{', '.join(map(repr, missing))} in {name}; available: "
                              f"{', '.join(available)}")
        prompts = [p for p in prompts if p.category in set(categories)]
    if limit is not None:
        prompts = prompts[:limit]
    if per_category is not None:
        chosen = set()
        for category in dict.fromkeys(p.category for p in prompts):
            idx = [i for i, p in enumerate(prompts) if p.category == category]
            random.Random(f"{seed}/{category}").shuffle(idx)
            chosen.update(idx[:per_category])
        prompts = [p for i, p in enumerate(prompts) if i in chosen]
    return prompts


def category_counts(prompts: list[Prompt]) -> str:
    """`translation 10, math_reasoning 10` (categories in order of first appearance): the run logs it."""
    counts: dict[str, int] = {}
    for p in prompts:
        counts[p.category] = counts.get(p.category, 0) + 1
    return ", ".join(f"{c} {n}" for c, n in counts.items())
