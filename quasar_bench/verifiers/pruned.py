"""Drop `share` of the decoder layers (round(share * L)), chosen by `criterion`: block_influence
(1 - cos(h_in, h_out) over calibration tokens; lowest dropped) or last."""
from __future__ import annotations

import logging

from ..errors import unknown
from . import Precision, calibration_params

log = logging.getLogger(__name__)


def _params(vcfg) -> dict:
    from ..pruning import CRITERIA, check_share

    criterion = vcfg.criterion
    if criterion not in CRITERIA:
        raise unknown("verifier.criterion", criterion, CRITERIA)
    p = {"share": check_share(vcfg.share), "criterion": criterion}
    if criterion == "block_influence":
        p["calibration"] = calibration_params(vcfg)
    return p


def _build(loaded, vcfg, params, cache_dir):
    from ..calibration import CalibrationSpec, calibration_ids
    from ..pruning import block_influence, choose_layers

    rt = loaded.runtime
    influence = None
    if params["criterion"] == "block_influence":
        influence = block_influence(rt, calibration_ids(loaded, CalibrationSpec(**params["calibration"]), cache_dir))
    keep = choose_layers(rt.num_layers, params["share"], params["criterion"], influence)
    log.info("verifier pruned: dropping layers %s", [i for i in range(rt.num_layers) if i not in keep])
    new = rt.with_layers(keep)
    new.kept_layers = keep
    return new


PRECISIONS = [Precision("pruned", _build, _params, cached=True)]
