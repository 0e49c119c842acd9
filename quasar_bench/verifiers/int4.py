"""W4A16: asymmetric int4 weights in groups of `group_size` input channels; method rtn or gptq."""
from __future__ import annotations

import logging

from ..errors import QuasarError
from ..packing import check_int4_group
from ..quant import Int4Linear, clone_runtime, rtn_transform
from . import Precision, calibration_params, check_bits, lm_head_param

log = logging.getLogger(__name__)


def _params(vcfg) -> dict:
    check_bits(vcfg, 4)
    method = vcfg.method
    if method not in ("rtn", "gptq"):
        raise QuasarError(f"unknown verifier.method={method!r} for int4; choose rtn or gptq")
    try:
        g = int(vcfg.group_size)
    except (TypeError, ValueError):
        raise QuasarError(f"verifier.group_size={vcfg.group_size!r} is not an integer; use a multiple of 8, e.g. 128") from None
    check_int4_group(g)
    p = {"group_size": g, "method": method, "lm_head": lm_head_param(vcfg)}
    if method == "gptq":
        damp = float(vcfg.damp)
        if not 0 < damp < 1:
            raise QuasarError(f"verifier.damp={damp} must lie in (0, 1) (GPTQ dampening, e.g. 0.01)")
        p.update(damp=damp, calibration=calibration_params(vcfg))
    return p


def _build(loaded, vcfg, params, cache_dir):
    g = params["group_size"]
    make = lambda lin: Int4Linear.from_linear(lin, g)  # noqa: E731
    if params["method"] == "rtn":
        return rtn_transform(loaded.runtime, make, params["lm_head"])
    from ..calibration import CalibrationSpec, calibration_ids
    from ..gptq import gptq_runtime

    seqs = calibration_ids(loaded, CalibrationSpec(**params["calibration"]), cache_dir)
    new = clone_runtime(loaded.runtime)
    gptq_runtime(new, seqs, g, params["damp"], log=log.debug)
    if params["lm_head"]:  # GPTQ covers the decoder linears; the head is rounded to nearest
        new.lm_head = make(new.lm_head)
    return new


PRECISIONS = [Precision("int4", _build, _params, cached=True)]
