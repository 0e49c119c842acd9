"""Draft model: a separate, cheaper model with the verifier's tokenizer drafts k tokens
autoregressively (Leviathan et al. 2023; Chen et al. 2023).

Either `model:` (when given, it wins over `precision:`; another model config, loaded with load_model: e.g. a smaller model of the same
family, or a tiny random one for tests) or `precision:` (the verifier model itself at a cheaper
precision, e.g. int4, built with quasar_bench.verifiers.build_verifier; `verifier:` passes extra
settings). The draft model keeps its own KV cache holding the accepted context: after each verify
step it is rolled back to the accepted length, and the next proposal first feeds the tokens the
verifier added. A different tokenizer (vocabulary or the ids of a probe text differ) is refused.
"""
from __future__ import annotations

import torch
from omegaconf import OmegaConf

from ..errors import QuasarError
from . import Drafter

PROBE = "Speculative decoding: the draft proposes, the verifier disposes. 12345 ÄÖÜ ß — 東京 🙂\n\tdef f(x): return x"

_LOADED = {}  # draft models by config, loaded once per process


def same_tokenizer(a, b) -> str | None:
    """None when a and b tokenize identically, else a few words naming the difference."""
    if a is None or b is None:
        return None
    va, vb = a.get_vocab(), b.get_vocab()
    if len(va) != len(vb):
        return f"vocabulary sizes differ ({len(va)} vs {len(vb)})"
    if va != vb:
        return "vocabularies map tokens to different ids"
    if a(PROBE)["input_ids"] != b(PROBE)["input_ids"]:
        return "the same probe text tokenizes differently"
    return None


def same_weights(a, b) -> bool:
    """Whether two runtimes compute with the same weights: the same parameter and buffer names,
    each equal (a draft model identical to its verifier accepts every draft: an oracle, not a drafter)."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].shape == sb[k].shape and sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


class DraftModel(Drafter):
    name = "draft_model"

    def __init__(self, cfg, runtime, loaded=None, tools=None):
        super().__init__(cfg, runtime, loaded, tools)
        mcfg, precision = cfg.model, cfg.precision
        if mcfg is None and precision is None:
            raise QuasarError("draft_model needs drafter.model=<model config> (a separate model with the same "
                              "tokenizer) or drafter.precision=<int8|w8a8|int4|...>")
        if mcfg is not None:
            key = OmegaConf.to_yaml(OmegaConf.create(mcfg)) if not isinstance(mcfg, str) else mcfg
            if key not in _LOADED:
                from ..models import load_model

                node = OmegaConf.create({"name": mcfg}) if isinstance(mcfg, str) else OmegaConf.create(mcfg)
                _LOADED[key] = load_model(node)
            draft = _LOADED[key]
            self.draft_rt, draft_tok = draft.runtime, draft.tokenizer
        else:
            self.draft_rt, draft_tok = self.cheaper_verifier(cfg, str(precision)), getattr(loaded, "tokenizer", None)
        why = same_tokenizer(getattr(loaded, "tokenizer", None), draft_tok)
        if why is None and (getattr(loaded, "tokenizer", None) is None or draft_tok is None) \
                and self.draft_rt.vocab_size != runtime.vocab_size:
            why = f"vocabulary sizes differ ({self.draft_rt.vocab_size} vs {runtime.vocab_size})"
        if why:
            raise QuasarError(f"the draft model's tokenizer differs from the verifier's ({why}); pick a draft "
                              "model of the same family (same tokenizer)")
        self.vocab = runtime.vocab_size
        self.same_as_verifier = same_weights(self.draft_rt, runtime)
        graphs = getattr(runtime, "graphs", None)
        if graphs is not None and getattr(self.draft_rt, "is_native", False) and self.draft_rt.graphs is None:
            # The draft model's forwards (one token per draft, catch-up feeds of up to k + 1) replay
            # CUDA graphs like the verifier's: timed drafting must not pay eager launch costs.
            self.draft_rt.enable_cuda_graphs(max_tokens=graphs.max_tokens, max_len=graphs.max_len)
            self.draft_rt.reset(self.draft_rt.graphs.max_len)
            self.draft_rt.graphs.capture_all()
        self.cached: list[int] = []  # token ids whose keys/values the draft cache holds
        self._ctx_len = None  # len(context) at this step's proposal

    def for_sequence(self, runtime):
        twin = super().for_sequence(runtime)
        twin.draft_rt = self.draft_rt.sibling()  # same draft weights, a cache per sequence (forwards run eagerly)
        return twin

    def cheaper_verifier(self, cfg, precision):
        vcfg = OmegaConf.create({"name": precision, **(OmegaConf.to_container(OmegaConf.create(cfg.verifier))
                                                      if cfg.get("verifier") else {})})
        # The harness's build_verifier returns a runtime of its own (shared by the run's draft
        # models of that precision, never the verifier's); the verifier itself is untouched.
        return self.tools.need("build_verifier", self.name)(vcfg)

    def start(self, prompt_ids, reference=None):
        max_len = self.max_len or len(prompt_ids) + 2048
        self.draft_rt.reset(max_len)
        self.cached = []
        self._ctx_len = None
        if len(prompt_ids) > 1:
            self.draft_rt.prefill(torch.tensor(prompt_ids[:-1], device=self.draft_rt.device))
            self.cached = list(prompt_ids[:-1])

    def propose(self, context, k):
        rt = self.draft_rt
        # Keep the longest cached prefix of the context (observe() already rolled back to it).
        n = 0
        limit = min(len(self.cached), len(context) - 1)
        while n < limit and self.cached[n] == context[n]:
            n += 1
        rt.rollback(n)

        def step(feed):
            logits = rt.forward(torch.tensor(feed, device=rt.device))[-1]
            if logits.shape[-1] != self.vocab:  # padded embeddings: score only the verifier's ids
                row = torch.full((self.vocab,), float("-inf"), device=logits.device)
                m = min(self.vocab, logits.shape[-1])
                row[:m] = logits[:m]
                logits = row
            return logits
        draft = self.draft_chain(step, list(context[n:]), k)
        # The cache now holds context + tokens[:-1].
        self.cached = list(context) + draft.tokens[:-1]
        self._ctx_len = len(context)
        return draft

    def row_fields(self) -> dict:
        """`draft_same_weights`: the draft model is the verifier itself (its tau is an oracle's)."""
        return {"draft_same_weights": self.same_as_verifier}

    def observe(self, accepted, new_tokens):
        # Roll the draft cache back to the accepted context (context + accepted drafts); the
        # verifier's own next token is fed at the next proposal.
        if self._ctx_len is None:
            return  # no proposal this step (last token of the generation)
        keep = self._ctx_len + min(accepted, len(self.cached) - self._ctx_len)
        self.draft_rt.rollback(keep)
        self.cached = self.cached[:keep]
        self._ctx_len = None
