"""Fidelity of a verifier against the reference precision (definitions in the README).

logit KL = KL(p_ref || p_ver) at temperature 1 in fp32 at every position of the reference's greedy
continuation, teacher-forced; top-1 agreement = share of those positions whose argmax agrees. The
logits come from the runtime's forward_fp32_head: the final norm and the LM head run in fp32 (on a
bf16 GPU model the head would otherwise round every logit to bf16 before the softmax).
"""
from __future__ import annotations

import math

import torch


def teacher_forced_logprobs(runtime, prompt_ids: list[int], continuation: list[int]) -> torch.Tensor:
    """Log-probs [len(continuation), V] predicting each continuation token: the prompt but its last
    token fills the cache (no LM head), then one forward over the positions that predict."""
    ids = list(prompt_ids) + list(continuation)
    runtime.reset(len(ids))
    if not continuation:
        return torch.empty(0, runtime.vocab_size)
    if len(prompt_ids) > 1:
        runtime.prefill(torch.tensor(prompt_ids[:-1], device=runtime.device))
    logits = runtime.forward_fp32_head(torch.tensor(ids[len(prompt_ids) - 1 : -1], device=runtime.device))
    runtime.reset(len(ids))  # leave an empty cache behind
    return torch.log_softmax(logits, dim=-1).cpu()


def logit_fidelity(ref_logprobs: torch.Tensor, ver_logprobs: torch.Tensor) -> dict:
    if ref_logprobs.shape != ver_logprobs.shape:
        raise ValueError(f"shape mismatch {tuple(ref_logprobs.shape)} vs {tuple(ver_logprobs.shape)}")
    if ref_logprobs.shape[0] == 0:
        return dict(kl_mean=math.nan, kl_p50=math.nan, kl_p95=math.nan, kl_max=math.nan, top1_agree=math.nan)
    kl = (ref_logprobs.exp() * (ref_logprobs - ver_logprobs)).sum(-1).clamp(min=0.0)
    top1 = (ref_logprobs.argmax(-1) == ver_logprobs.argmax(-1)).float().mean()
    return dict(kl_mean=kl.mean().item(), kl_p50=kl.quantile(0.5).item(), kl_p95=kl.quantile(0.95).item(),
                kl_max=kl.max().item(), top1_agree=top1.item())


def match_metrics(output_ids: list[int], reference_ids: list[int]) -> dict:
    """Exact match with the reference continuation, first divergence (-1 if none), agreement share
    of tokens before the divergence (over the reference's length)."""
    n = min(len(output_ids), len(reference_ids))
    first = next((i for i in range(n) if output_ids[i] != reference_ids[i]), None)
    if first is None and len(output_ids) != len(reference_ids):
        first = n
    exact = first is None
    agree = (len(reference_ids) if exact else first) / max(len(reference_ids), 1)
    return dict(ref_exact_match=exact, first_divergence=-1 if exact else first, ref_token_agree=agree)
