"""Self-speculation with the verifier's own weights and a subset of its layers skipped
(Draft & Verify, Zhang et al. 2024; SWIFT, Xia et al. 2025).

Each drafted token feeds the previous one through the kept layers (`runtime.forward(ids,
layer_ids=kept)`, then the final norm and the LM head) on the verifier's own KV cache: the verified
prefix holds full-model keys/values, the drafted positions the kept layers' ones; the loop rolls the
cache back and the verify forward rewrites every layer there. Drafting stops early when the
drafter's top-1 probability falls below `threshold` (adaptive draft length; 0 = always k).

Skip set: `mode: static` takes `skip: [...]` (the verifier's layer indices); `mode: search` picks it
on calibration sequences (a calibration prompt + the full model's greedy continuation) by greedy
search, SWIFT-style: a candidate set is scored by the top-1 agreement `a` of the skipped model with
the full model, teacher-forced over the continuation (prompt prefilled with all layers).
The search runs once, on the reference verifier's runtime when the harness lends it
(`tools.reference_runtime`), so every verifier of a run drafts with the same layers and a
verifier's numbers are not mixed with a search of its own; a pruned verifier gets the same set
mapped through the layers it kept (`kept_layers`). Without a reference (direct API use), or when
a verifier's layers cannot be mapped to the reference's, the search runs on the verifier itself. Objective `speed` maximises the expected tokens
per unit cost E[tau](a) / (1 + k * kept/L) (`predicted_speed`), E[tau](a) = (1 - a^(k+1)) / (1 - a) (one verify forward
costs 1, a draft forward kept/L; 1.0 = AR), over the non-empty sets on the greedy path (skipping
nothing is not self-speculation; a warning says when even the best is predicted slower than AR);
objective `acceptance` maximises `a` at `target_skip_ratio`.
Each greedy step adds the layer whose skipping scores best, among `candidates` layers preselected
by their single-layer score (0 = all). The result is cached as json under
`cache_dir/layerskip/` (default ~/.cache/quasar_bench), keyed by the model name, a fingerprint of
the searched weights (the reference's: one entry for all verifiers), a hash of the calibration
prompt ids, `cache_key` and the search settings. Rows carry the layers drafted with, in the loaded
model's numbering, and where they came from (`row_fields`: draft_layers, draft_layers_source).
A skip set that could not pay even if every draft were accepted (predicted speed at a = 1 below
USEFUL_BEST_SPEED, e.g. 29 of 30 layers kept) is logged as a warning when the drafter is built.
"""
from __future__ import annotations

import hashlib
import json
import logging

import torch

from ..errors import QuasarError
from ..fileio import cache_root, read_json, write_json
from ..fingerprint import weights_fingerprint
from . import Drafter

log = logging.getLogger(__name__)


def expected_tau(a: float, k: int) -> float:
    """Expected tokens per verify step with k drafts each accepted independently with probability a."""
    return float(k + 1) if a >= 1.0 else (1.0 - a ** (k + 1)) / (1.0 - a)


def predicted_speed(a: float, k: int, kept_share: float) -> float:
    """Tokens per unit cost relative to AR (1.0 = AR): one verify forward costs 1, each of the k
    draft forwards `kept_share` of it. Optimistic: a verify forward over k + 1 tokens is taken to
    cost what a 1-token forward does (memory-bound decoding)."""
    return expected_tau(a, k) / (1.0 + k * kept_share)


# Below this predicted speed at perfect acceptance (every draft accepted) a skip set cannot pay:
# real acceptance is lower and a wider verify forward costs more than 1.
USEFUL_BEST_SPEED = 1.2


class SkipSearch:
    """Greedy search of the skip set on calibration sequences (see the module docstring)."""

    def __init__(self, runtime, seqs, k: int):
        self.k, self.L = k, runtime.num_layers
        # One weight-sharing copy per sequence, each with its own cache holding the prompt (all layers).
        self.items = []
        for prompt, cont in seqs:
            if not cont:
                continue
            rt = runtime.with_layers(list(range(self.L)))
            rt.reset(len(prompt) + len(cont) + 1)
            if len(prompt) > 1:
                rt.prefill(torch.tensor(prompt[:-1], device=rt.device))
            feed = torch.tensor([prompt[-1]] + cont[:-1], device=rt.device)
            self.items.append((rt, len(prompt) - 1, feed, torch.tensor(cont, device=rt.device)))
        if not self.items:
            raise QuasarError("layerskip search: the calibration continuations are empty; raise "
                              "drafter.search.gen_tokens or use mode=static with skip=[...]")
        self.evals = 0

    def agreement(self, skip: set[int]) -> float:
        kept = [i for i in range(self.L) if i not in skip]
        agree = total = 0
        for rt, base, feed, target in self.items:
            rt.rollback(base)
            pred = rt.forward(feed, layer_ids=kept).argmax(-1)
            agree += int((pred == target).sum())
            total += target.numel()
        self.evals += 1
        return agree / total

    def speed(self, a: float, n_skip: int) -> float:
        return predicted_speed(a, self.k, (self.L - n_skip) / self.L)

    def run(self, objective: str, target_ratio: float, max_ratio: float, candidates: int) -> dict:
        L = self.L
        n_target = round(target_ratio * L) if objective == "acceptance" else round(max_ratio * L)
        n_target = max(0, min(n_target, L - 1))
        single = {i: self.agreement({i}) for i in range(L)}
        order = sorted(range(L), key=lambda i: -single[i])
        skip: set[int] = set()
        path = [{"skip": [], "agreement": 1.0, "speed": self.speed(1.0, 0)}]
        while len(skip) < n_target:
            pool = [i for i in order if i not in skip]
            if candidates > 0:
                pool = pool[:candidates]
            scored = [(self.agreement(skip | {i}) if skip else single[i], i) for i in pool]
            a, best = max(scored)
            skip.add(best)
            path.append({"skip": sorted(skip), "agreement": a, "speed": self.speed(a, len(skip))})
        if objective == "acceptance":
            chosen = path[-1]
        else:  # skipping nothing is not self-speculation: the best non-empty set on the path
            chosen = max(path[1:] or path, key=lambda p: p["speed"])
            if chosen["speed"] < 1.0:
                log.warning("layerskip search: the best skip set %s is predicted slower than AR "
                            "(speed %.2f of AR: agreement %.2f)", chosen["skip"], chosen["speed"], chosen["agreement"])
        return {"skip": chosen["skip"], "agreement": chosen["agreement"], "speed": chosen["speed"],
                "path": path, "evaluations": self.evals}


class LayerSkip(Drafter):
    name = "layerskip"
    layers_source = "static"  # static (config) | search:reference | search:verifier

    def __init__(self, cfg, runtime, loaded=None, tools=None):
        super().__init__(cfg, runtime, loaded, tools)
        self.threshold = float(cfg.threshold)
        if not 0.0 <= self.threshold <= 1.0:
            raise QuasarError(f"drafter.threshold={self.threshold} must lie in [0, 1] (0 = always draft k)")
        self.kept = self.choose_layers(cfg)
        if not self.kept:
            raise QuasarError(f"{self.name} would run no layer at all; keep at least one of the "
                              f"{runtime.num_layers} layers")
        best = predicted_speed(1.0, self.k, len(self.kept) / runtime.num_layers)
        if best < USEFUL_BEST_SPEED:  # a degenerate cell: say so where the run is read
            log.warning("layerskip keeps %d of %d layers: even accepting every draft it would reach %.2fx AR "
                        "(k=%d drafts at %d/%d of a forward each); it drafts at nearly the verifier's cost. "
                        "Skip more layers (README: minimum useful layerskip settings)", len(self.kept),
                        runtime.num_layers, best, self.k, len(self.kept), runtime.num_layers)

    # -- which layers --------------------------------------------------------------------------
    def choose_layers(self, cfg) -> list[int]:
        L = self.runtime.num_layers
        mode = cfg.mode
        if mode == "static":
            skip = cfg.skip or []
        elif mode == "search":
            skip = self.search(cfg)
        else:
            raise QuasarError(f"unknown drafter.mode={mode}; choose static (with skip=[...]) or search")
        try:
            skip = sorted({int(i) for i in skip})
        except (TypeError, ValueError):
            raise QuasarError(f"drafter.skip={list(skip)} must be a list of layer indices 0..{L - 1}") from None
        bad = [i for i in skip if not 0 <= i < L]
        if bad:
            raise QuasarError(f"drafter.skip names layers {bad} that do not exist: the verifier has layers "
                              f"0..{L - 1}")
        self.skip = skip
        return [i for i in range(L) if i not in set(skip)]

    def search(self, cfg) -> list[int]:
        s = cfg.search
        objective = s.objective
        if objective not in ("speed", "acceptance"):
            raise QuasarError(f"unknown drafter.search.objective={objective}; choose speed or acceptance")
        params = {"objective": objective, "target_skip_ratio": float(s.target_skip_ratio),
                  "max_skip_ratio": float(s.max_skip_ratio), "candidates": int(s.candidates),
                  "prompts": int(s.prompts), "gen_tokens": int(s.gen_tokens), "seed": int(s.seed), "k": self.k}
        for key in ("target_skip_ratio", "max_skip_ratio"):
            if not 0.0 <= params[key] < 1.0:
                raise QuasarError(f"drafter.search.{key}={params[key]} must lie in [0, 1)")
        if params["prompts"] < 1 or params["gen_tokens"] < 1:
            raise QuasarError("drafter.search.prompts and drafter.search.gen_tokens must be >= 1")
        target, numbering = self.search_target()
        self.layers_source = "search:reference" if numbering is not None else "search:verifier"
        model = getattr(self.loaded, "name", None) or "model"
        prompts = self.tools.need("calibration_prompts", self.name)(params["prompts"], params["seed"])
        ident = {"version": 4, "model": model, "weights": weights_fingerprint(target),
                 "calibration": hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:16],
                 "cache_key": cfg.cache_key, **params}
        digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
        path = cache_root(cfg.cache_dir) / "layerskip" / f"{model}-{digest}.json"
        found = read_json(path)
        if found is not None and found.get("identity") == ident and "skip" in found:
            result = found
        else:
            log.info("layerskip: searching a skip set for %s on the %s (cached in %s)", model,
                     "reference verifier" if numbering is not None else "verifier", path)
            full = target.with_layers(list(range(target.num_layers)))
            greedy = self.tools.need("greedy", self.name)
            seqs = [(ids, greedy(full, ids, params["gen_tokens"])) for ids in prompts]
            result = SkipSearch(target, seqs, self.k).run(objective, params["target_skip_ratio"],
                                                        params["max_skip_ratio"], params["candidates"])
            result["identity"] = ident
            write_json(path, result)
        self.search_result = result
        if numbering is None:
            return result["skip"]
        skip = [j for j, layer in enumerate(numbering) if layer in set(result["skip"])]  # this verifier's indices
        if len(skip) < len(result["skip"]):
            log.warning("layerskip: the verifier lacks layers %s of the searched skip set %s; it skips %s of its own",
                        sorted(set(result["skip"]) - {numbering[j] for j in skip}), result["skip"], skip)
        return skip

    def layer_numbering(self) -> list[int] | None:
        """The loaded model's index of each of the verifier's layers (a pruned verifier keeps a
        subset, `kept_layers`), or None when they cannot be told."""
        kept = getattr(self.runtime, "kept_layers", None)
        numbering = list(kept) if kept is not None else list(range(self.runtime.num_layers))
        return numbering if len(numbering) == self.runtime.num_layers else None

    def search_target(self):
        """(runtime to search on, the verifier's layers in its numbering): the reference runtime
        lent by the harness when the verifier's layers map onto its layers, else the verifier (None)."""
        ref = self.tools.reference_runtime
        if ref is None or ref is self.runtime:
            return self.runtime, (list(range(self.runtime.num_layers)) if ref is not None else None)
        numbering = self.layer_numbering()
        if numbering is None or max(numbering, default=-1) >= ref.num_layers:
            log.warning("layerskip: the verifier's %d layers do not map onto the reference's %d; searching "
                        "on the verifier itself", self.runtime.num_layers, ref.num_layers)
            return self.runtime, None
        return ref, numbering

    def row_fields(self) -> dict:
        """The layers this drafter runs, in the loaded model's numbering, and where the set came from."""
        numbering = self.layer_numbering() or list(range(self.runtime.num_layers))
        return {"draft_layers": [numbering[i] for i in self.kept], "draft_layers_source": self.layers_source}

    # -- drafting ----------------------------------------------------------------------------
    def propose(self, context, k):
        device = self.runtime.device

        def step(feed):
            return self.runtime.forward(torch.tensor(feed, device=device), layer_ids=self.kept)[-1]
        return self.draft_chain(step, [context[-1]], k, self.threshold)
