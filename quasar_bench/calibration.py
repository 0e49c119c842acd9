"""Calibration text for GPTQ, SmoothQuant and block-influence pruning: offline and reproducible.

Source: the project's own calibration prompts (quasar_bench/prompts/calibration.jsonl: 24 prompts
written for this project, Apache-2.0: writing, coding, maths, summarising, translation, QA), which
no evaluation set includes; in file order, formatted like the served prompts (chat template when
the model has one), each followed by the model's own greedy continuation (fp32 reference weights,
`gen_tokens` tokens or up to EOS). Fixed: the first `n_sequences` prompts, `gen_tokens` generated
tokens, at most `max_tokens` tokens per sequence. Greedy decoding makes the set a pure function of
the model's weights, so it is the same on every run. `check_disjoint` refuses a run whose
evaluated prompts share text with them (run.py calls it), so no number is measured on prompts
the verifier (GPTQ, SmoothQuant, pruning) or a drafter's search was fitted on.

A model without a tokenizer (tests build LoadedModel(tokenizer=None) around tiny random models)
gets seeded random prompt ids (torch.Generator seed `seed`) of 24..56 tokens instead, each followed
by the model's greedy continuation in the same way.

The token ids are cached as json under cache_dir/verifiers/ keyed by the model fingerprint, these
parameters and a hash of the calibration file.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import QuasarError
from .fileio import read_json, write_json
from .fingerprint import model_fingerprint


@dataclass(frozen=True)
class CalibrationSpec:
    n_sequences: int
    gen_tokens: int
    max_tokens: int
    seed: int

    @classmethod
    def from_cfg(cls, vcfg) -> "CalibrationSpec":
        c = vcfg.calibration
        spec = cls(int(c.n_sequences), int(c.gen_tokens), int(c.max_tokens), int(c.seed))
        if spec.n_sequences < 1 or spec.gen_tokens < 0 or spec.max_tokens < 2:
            raise QuasarError(f"bad verifier.calibration {spec}: need n_sequences >= 1, gen_tokens >= 0, "
                              "max_tokens >= 2")
        return spec


CALIBRATION_FILE = Path(__file__).resolve().parent / "prompts" / "calibration.jsonl"


def calibration_texts() -> list[str]:
    """The calibration prompts' text (one turn each), in file order."""
    from .data import package_prompts

    return [p.turns[0] for p in package_prompts(CALIBRATION_FILE.name, "calibration")]


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def check_disjoint(prompts, texts: list[str] | None = None) -> None:
    """Refuse evaluated `prompts` (data.Prompt) whose first turn equals, contains or is contained
    in a calibration prompt (whitespace and case ignored): one line naming both."""
    cal = [(i, _norm(t)) for i, t in enumerate(texts if texts is not None else calibration_texts(), 1)]
    for p in prompts:
        first = _norm(p.turns[0])
        if not first:
            continue
        for i, c in cal:
            if first in c or c in first:
                raise QuasarError(f"evaluated prompt {p.dataset}/{p.prompt_id} overlaps calibration prompt calib-{i} "
                                  f"({CALIBRATION_FILE.name}): numbers on it would be measured on calibration "
                                  "text; drop it (dataset.categories=, a prompt file without it) or edit the file")


def calibration_prompts(loaded, n: int, seed: int = 0) -> list[list[int]]:
    """n encoded calibration prompts: the calibration file's prompts, in file order, encoded as
    served (encode.encode_turn); seeded random ids of 24..56 tokens for a model without a
    tokenizer (tests' tiny random models)."""
    if loaded.tokenizer is None:
        g = torch.Generator().manual_seed(seed)
        v = loaded.runtime.vocab_size
        return [torch.randint(0, v, (int(torch.randint(24, 57, (1,), generator=g)),), generator=g).tolist()
                for _ in range(n)]
    from .encode import encode_turn

    texts = calibration_texts()
    if n > len(texts):
        raise QuasarError(f"{n} calibration prompts exceed the {len(texts)} of {CALIBRATION_FILE.name}; ask for fewer")
    return [encode_turn(loaded, [t]) for t in texts[:n]]


def calibration_ids(loaded, spec: CalibrationSpec, cache_dir: Path | None) -> list[list[int]]:
    """The calibration sequences (token ids), generated once per model and cached."""
    path = None
    if cache_dir is not None:
        source = hashlib.sha256(CALIBRATION_FILE.read_bytes()).hexdigest()[:12]
        key = hashlib.sha256(json.dumps({**spec.__dict__, "source": source}, sort_keys=True).encode()).hexdigest()[:12]
        path = Path(cache_dir) / "verifiers" / f"calib-{model_fingerprint(loaded)}-{key}.json"
        cached = read_json(path)
        if cached is not None and "sequences" in cached:
            return cached["sequences"]
    prompts = [ids[: spec.max_tokens] for ids in calibration_prompts(loaded, spec.n_sequences, spec.seed)]
    lengths = [min(spec.gen_tokens, spec.max_tokens - len(ids)) for ids in prompts]
    if loaded.hf_model is not None:
        gens = batched_greedy(loaded.hf_model, prompts, lengths, loaded.eos_ids or ())
    else:  # a runtime built without a transformers model (tests): one sequence at a time
        from .decode import greedy_continuation
        from .quant import clone_runtime

        runtime = clone_runtime(loaded.runtime)  # own KV cache; loaded.runtime is not touched
        gens = [greedy_continuation(runtime, ids, n, loaded.eos_ids or ()) if n > 0 else [] for ids, n in zip(prompts, lengths)]
    seqs = [(ids + gen)[: spec.max_tokens] for ids, gen in zip(prompts, gens)]
    if path is not None:
        write_json(path, {"spec": spec.__dict__, "source": "calibration.jsonl prompts + greedy continuations", "sequences": seqs},
                   indent=None)
    return seqs


@torch.inference_mode()
def batched_greedy(hf_model, prompts: list[list[int]], lengths: list[int], eos_ids=(), batch: int = 16) -> list[list[int]]:
    """Each prompt's greedy continuation of lengths[i] tokens (EOS included, then stop), `batch`
    prompts at a time through the transformers model: left-padded, padding masked out and positions
    counted from each prompt's first token, so every row is the continuation its prompt gets alone
    (up to the summation order of batched products). A 2-core CPU makes SmolLM2's 16 x 48 tokens
    ~8x faster than one sequence at a time."""
    from transformers import DynamicCache

    device, eos = hf_model.device, set(eos_ids)
    out: list[list[int]] = [[] for _ in prompts]
    for lo in range(0, len(prompts), batch):
        rows = list(range(lo, min(lo + batch, len(prompts))))
        steps = max(lengths[i] for i in rows)
        if steps <= 0:
            continue
        width = max(len(prompts[i]) for i in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long, device=device)
        mask = torch.zeros(len(rows), width, dtype=torch.long, device=device)
        for r, i in enumerate(rows):
            ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i], device=device)
            mask[r, width - len(prompts[i]):] = 1
        cache, done = DynamicCache(config=hf_model.config), torch.zeros(len(rows), dtype=torch.bool)
        for _ in range(steps):
            pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
            logits = hf_model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                              use_cache=True, logits_to_keep=1).logits[:, -1]
            ids = logits.argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
            for r, (i, tok) in enumerate(zip(rows, ids[:, 0].tolist())):
                if not done[r] and len(out[i]) < lengths[i]:
                    out[i].append(tok)
                    done[r] = tok in eos
            if all(done[r] or len(out[i]) >= lengths[i] for r, i in enumerate(rows)):
                break
    return out
