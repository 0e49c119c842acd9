"""Calibration text for GPTQ, SmoothQuant and block-influence pruning: offline and reproducible.

Source: the project's own builtin prompt set (quasar_bench/prompts/builtin.jsonl, written for this
project, Apache-2.0), first turn of each prompt in file order, formatted like the served prompts
(chat template when the model has one), each followed by the model's own greedy continuation
(fp32 reference weights, `gen_tokens` tokens or up to EOS). Fixed: the first `n_sequences`
prompts, `gen_tokens` generated tokens, at most `max_tokens` tokens per sequence. Greedy decoding
makes the set a pure function of the model's weights, so it is the same on every run.

A model without a tokenizer (tests build LoadedModel(tokenizer=None) around tiny random models)
gets seeded random prompt ids (torch.Generator seed `seed`) of 24..56 tokens instead, each followed
by the model's greedy continuation in the same way.

The token ids are cached as json under cache_dir/verifiers/ keyed by the model fingerprint and
these parameters.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import QuasarError


@dataclass(frozen=True)
class CalibrationSpec:
    n_sequences: int = 16
    gen_tokens: int = 48
    max_tokens: int = 256
    seed: int = 0

    @classmethod
    def from_cfg(cls, vcfg) -> "CalibrationSpec":
        c = vcfg.get("calibration", None) or {}
        spec = cls(int(c.get("n_sequences", 16)), int(c.get("gen_tokens", 48)), int(c.get("max_tokens", 256)),
                   int(c.get("seed", 0)))
        if spec.n_sequences < 1 or spec.gen_tokens < 0 or spec.max_tokens < 2:
            raise QuasarError(f"bad verifier.calibration {spec}: need n_sequences >= 1, gen_tokens >= 0, "
                              "max_tokens >= 2")
        return spec


def model_fingerprint(loaded) -> str:
    """Identity of the loaded weights: name, shapes, dtype and a strided sample of every tensor."""
    rt = loaded.runtime
    h = hashlib.sha256()
    h.update(str(loaded.name).encode())
    h.update(repr(getattr(rt, "args", None)).encode())
    h.update(str(rt.dtype).encode())
    for name, p in rt.state_dict().items():
        if "cache" in name:
            continue
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(flat[::step].float().cpu().numpy().tobytes())
    return f"{_slug(loaded.name)}-{h.hexdigest()[:16]}"


def _slug(s) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(s))[:40]


def _prompt_ids(loaded, spec: CalibrationSpec) -> list[list[int]]:
    tok = loaded.tokenizer
    if tok is None:
        g = torch.Generator().manual_seed(spec.seed)
        v = loaded.runtime.vocab_size
        return [torch.randint(0, v, (int(torch.randint(24, 57, (1,), generator=g)),), generator=g).tolist()
                for _ in range(spec.n_sequences)]
    from .data import load_prompts

    prompts = load_prompts("builtin")
    if spec.n_sequences > len(prompts):
        raise QuasarError(f"verifier.calibration.n_sequences={spec.n_sequences} exceeds the {len(prompts)} "
                          "builtin prompts; lower it")
    out = []
    for p in prompts[: spec.n_sequences]:
        if loaded.chat:
            text = tok.apply_chat_template([{"role": "user", "content": p.turns[0]}], add_generation_prompt=True,
                                           tokenize=False)
            ids = tok(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tok(p.turns[0] + "\n")["input_ids"]
        out.append(list(ids))
    return out


@torch.inference_mode()
def _greedy(runtime, ids: list[int], n: int, eos: set[int]) -> list[int]:
    out = []
    runtime.reset(len(ids) + n + 1)
    logits = runtime.forward(torch.tensor(ids, device=runtime.device))
    for _ in range(n):
        tok = int(logits[-1].argmax())
        out.append(tok)
        if tok in eos:
            break
        logits = runtime.forward(torch.tensor([tok], device=runtime.device))
    runtime.reset(1)
    return out


def calibration_ids(loaded, spec: CalibrationSpec, cache_dir: Path | None) -> list[list[int]]:
    """The calibration sequences (token ids), generated once per model and cached."""
    path = None
    if cache_dir is not None:
        key = hashlib.sha256(json.dumps(spec.__dict__, sort_keys=True).encode()).hexdigest()[:12]
        path = Path(cache_dir) / "verifiers" / f"calib-{model_fingerprint(loaded)}-{key}.json"
        if path.exists():
            return json.loads(path.read_text())["sequences"]
    from .quant import clone_runtime

    runtime = clone_runtime(loaded.runtime)  # own KV cache; loaded.runtime is not touched
    eos = set(loaded.eos_ids or [])
    seqs = []
    for ids in _prompt_ids(loaded, spec):
        ids = ids[: spec.max_tokens]
        gen = _greedy(runtime, ids, min(spec.gen_tokens, spec.max_tokens - len(ids)), eos) if spec.gen_tokens else []
        seqs.append((ids + gen)[: spec.max_tokens])
    del runtime
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"spec": spec.__dict__, "source": "builtin prompts + greedy continuations",
                                   "sequences": seqs}))
        os.replace(tmp, path)
    return seqs
