"""Planning: the run's configuration -> the cells to run, (verifier, [drafters]), and the order
their timed visits run in (`schedule`).

A matrix entry is a config name (`ngram`) or a mapping with `name` plus overrides, merged over
conf/<group>/<name>.yaml. The plan lists the baseline drafter (one that drafts nothing) first in
each verifier's list and the reference verifier first among verifiers (verifiers are built in
that order; the reference's continuations come first). The timed visits do not follow the plan:
`schedule` shuffles them, repeat by repeat and batch size by batch size, so drift over a run is not
confounded with a cell.
"""
from __future__ import annotations

import hashlib
import json
import random

from omegaconf import DictConfig, ListConfig, OmegaConf

from .config import check_local_paths, entry_config
from .drafters import drafter_class
from .errors import QuasarError
from .schema import check_settings
from .verifiers import precision


def cell_hash(obj) -> str:
    if isinstance(obj, DictConfig):
        obj = OmegaConf.to_container(obj, resolve=True)
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _entries(cfg, group: str, single: str, listed: str, entries=None) -> list[DictConfig]:
    chosen = cfg.get(single)
    if entries is None:
        entries = [chosen] if chosen is not None else list(cfg.matrix[listed])
    if not entries:
        raise QuasarError(f"matrix.{listed} is empty; name at least one {group}")
    out = [entry_config(group, e) for e in entries]
    if len(set(map(cell_hash, out))) != len(out):
        raise QuasarError(f"matrix.{listed} lists the same {group} twice: {[c.name for c in out]}")
    return out


def drafts(dcfg) -> bool:
    return drafter_class(dcfg).drafts


def drafter_configs(cfg, entries=None) -> list[DictConfig]:
    out = _entries(cfg, "drafter", "drafter", "drafters", entries)
    for d in out:
        if not drafts(d):
            continue
        if cfg.get("k") is not None:
            d.k = cfg.k
        if not isinstance(d.k, int) or isinstance(d.k, bool) or d.k < 1:
            raise QuasarError(f"k={d.k!r} is impossible for drafter {d.name}: k must be an integer >= 1 (e.g. k=5)")
    return sorted(out, key=drafts)


def verifier_configs(cfg, entries=None) -> list[DictConfig]:
    out = _entries(cfg, "verifier", "verifier", "verifiers", entries)
    return sorted(out, key=lambda v: not precision(v.name).is_reference)


def plan_cells(cfg) -> list[tuple[DictConfig, list[DictConfig]]]:
    """(verifier, drafters) to run: the product matrix.verifiers x matrix.drafters, plus each
    `matrix.extra` block ({verifiers: [...], drafters: [...]}: more drafters for some verifiers).
    `drafter=` / `verifier=` on the command line narrow the run to the product alone."""
    plan = [(v, drafter_configs(cfg)) for v in verifier_configs(cfg)]
    narrowed = cfg.get("drafter") is not None or cfg.get("verifier") is not None
    for block in ([] if narrowed else (cfg.matrix.get("extra") or [])):
        extra_drafters = drafter_configs(cfg, list(block.drafters))
        for v in verifier_configs(cfg, list(block.verifiers)):
            found = next((ds for pv, ds in plan if cell_hash(pv) == cell_hash(v)), None)
            if found is None:
                plan.append((v, found := []))
            have = {cell_hash(d) for d in found}
            found.extend(d for d in extra_drafters if cell_hash(d) not in have)
    plan.sort(key=lambda vd: not precision(vd[0].name).is_reference)
    return [(v, sorted(ds, key=drafts)) for v, ds in plan]


def schedule(plan, sizes: list[int], n_repeats: int, seed: int) -> list[tuple[int, int, int, DictConfig]]:
    """The timed visits of a run in the order they run: (repeat, index of the verifier in `plan`,
    batch size, drafter config). A cell is (verifier, batch size, drafter). Repeat r draws from
    random.Random(f"{seed}/repeat/{r}"): first the order of the batch sizes, then, for each size in
    that order, the order of its cells (listed in plan order: verifier, then drafter). So every
    comparison the tables make (verifiers, or drafters, at one batch size) is between visits that ran
    close together, and a run stopped part-way has whole batch sizes done, not a scatter of unpaired
    cells. All of repeat r runs before any of repeat r + 1. Each visit times every prompt of the cell once."""
    visits = []
    for r in range(n_repeats):
        rng = random.Random(f"{seed}/repeat/{r}")
        block_order = list(sizes)
        rng.shuffle(block_order)
        for size in block_order:
            block = [(vi, size, d) for vi, (_, ds) in enumerate(plan) for d in ds]
            rng.shuffle(block)
            visits += [(r, *cell) for cell in block]
    return visits


def repeats(cfg) -> int:
    """`repeats`: how many times each prompt of each cell is timed (configs without it: once)."""
    return cfg.get("repeats", 1)  # its type and range: schema.RunSettings


def batch_sizes(cfg) -> list[int]:
    """`batch_size`: one size, or a list (every cell runs at each, the model loaded once)."""
    value = cfg.get("batch_size", 1)
    sizes = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    if not sizes or len(set(sizes)) != len(sizes):
        raise QuasarError(f"batch_size={value} must name each size once (e.g. batch_size=4 or batch_size=[1,4,16])")
    return sizes


def validate(cfg) -> None:
    """Types and ranges of the run's settings (schema.py), then what no single type says, one line
    naming the setting (the command line and direct API use both come through here, before any
    model is loaded)."""
    check_settings(cfg)
    batch_sizes(cfg)
    ds, model = cfg.dataset, cfg.model
    if ds.name == "builtin" and ds.get("path"):
        raise QuasarError(f"dataset.path={ds.path} is not read by the builtin prompt set; pick dataset=spec_bench "
                          "or dataset=mt_bench to read a question.jsonl, or drop dataset.path=")
    check_local_paths(model)
    k, room = cfg.get("k"), model.get("max_seq_len")
    if k is not None and isinstance(room, int) and k + cfg.max_new_tokens + 1 > room:
        raise QuasarError(f"k={k} + max_new_tokens={cfg.max_new_tokens} + 1 = {k + cfg.max_new_tokens + 1} positions "
                          f"exceed model.max_seq_len={room} before any prompt token; lower k= or max_new_tokens=, "
                          "or raise model.max_seq_len=")
