"""Layer pruning: drop a share of whole decoder layers (runtime.with_layers shares the weights).

Criteria:
  block_influence  BI_i = 1 − cos(h_in, h_out) of layer i, averaged over every calibration token
                   (Men et al., 2024, "ShortGPT"); the layers with the lowest BI are dropped.
  last             drop the last layers (the naive comparison).
The number dropped is round(share · L) (half up), at least 1 and at most L − 1.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import QuasarError, unknown

CRITERIA = ("block_influence", "last")


def check_share(share) -> float:
    try:
        share = float(share)
    except (TypeError, ValueError):
        raise QuasarError(f"verifier.share={share!r} is not a number; use a fraction in (0, 1), e.g. 0.25") from None
    if not 0 < share < 1:
        raise QuasarError(f"verifier.share={share} must lie in (0, 1): the share of decoder layers to drop "
                          "(e.g. verifier.share=0.25)")
    return share


def n_dropped(share: float, num_layers: int) -> int:
    share = check_share(share)
    n = int(math.floor(share * num_layers + 0.5))
    if n < 1 or n >= num_layers:
        raise QuasarError(f"verifier.share={share} drops {n} of {num_layers} layers; pick a share that drops "
                          f"between 1 and {num_layers - 1}")
    return n


@torch.inference_mode()
def block_influence(runtime, seqs: list[list[int]]) -> list[float]:
    """Mean over calibration tokens of 1 − cos(h_in, h_out) for each decoder layer."""
    total = torch.zeros(runtime.num_layers, dtype=torch.float64)
    count = 0
    for s in seqs:
        hs = runtime.hidden_states(torch.tensor(s, device=runtime.device))
        for i in range(runtime.num_layers):
            cos = F.cosine_similarity(hs[i].float(), hs[i + 1].float(), dim=-1)
            total[i] += (1.0 - cos).double().sum().cpu()
        count += len(s)
    return (total / max(count, 1)).tolist()


def choose_layers(num_layers: int, share: float, criterion: str, influence: list[float] | None = None) -> list[int]:
    """The layer indices kept (ascending)."""
    if criterion not in CRITERIA:
        raise unknown("verifier.criterion", criterion, CRITERIA)
    n = n_dropped(share, num_layers)
    if criterion == "last":
        drop = set(range(num_layers - n, num_layers))
    else:
        order = sorted(range(num_layers), key=lambda i: (influence[i], i))
        drop = set(order[:n])
    return [i for i in range(num_layers) if i not in drop]
