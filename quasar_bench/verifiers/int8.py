"""W8A16: int8 weights, symmetric per output channel (RTN); activations in the model's dtype."""
from __future__ import annotations

from ..quant import Int8Linear, rtn_transform
from . import Precision, check_bits, lm_head_param


def _params(vcfg) -> dict:
    check_bits(vcfg, 8)
    return {"lm_head": lm_head_param(vcfg)}


PRECISIONS = [Precision("int8", lambda loaded, vcfg, params, cache_dir: rtn_transform(
    loaded.runtime, Int8Linear.from_linear, params["lm_head"]), _params, cached=True)]
