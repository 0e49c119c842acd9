"""The model's own quantized weights, read from a GPTQ or compressed-tensors (llmcompressor)
checkpoint (checkpoints.py): a user verifies with the int4 / W8A8 model they already have. The
loaded model is the full-precision reference it was quantized from (fidelity is measured against
it); this verifier takes every weight from the checkpoint: quantized linears packed, embeddings,
norms and unquantized linears as stored."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import QuasarError
from . import Precision


def checkpoint_folder(loaded, vcfg) -> Path | None:
    """verifier.path, else the quantized checkpoint given as model.path (models.load_model)."""
    path = vcfg.get("path") or getattr(loaded, "checkpoint_path", None)
    return Path(os.path.expanduser(str(path))).resolve() if path else None


def _check(loaded, vcfg) -> str | None:
    from ..checkpoints import check_same_architecture, check_supported, quantization_config

    folder = checkpoint_folder(loaded, vcfg)
    if folder is None:
        return ("needs a quantized checkpoint: model.path=<quantized folder> model.reference_path=<the "
                "full-precision model>, or verifier.path=<quantized folder>")
    if not folder.is_dir():
        return f"verifier.path={folder} is not a folder; pass the quantized checkpoint's folder"
    q = quantization_config(folder)
    if q is None:
        return f"{folder} is not a quantized checkpoint (no quantization_config in config.json)"
    try:
        check_supported(q, folder)
        if loaded.hf_model is not None:
            check_same_architecture(folder, loaded.hf_model.config)
    except QuasarError as e:
        return str(e)
    return None


def _params(vcfg) -> dict:
    return {"path": vcfg.get("path")}


def _build(loaded, vcfg, params, cache_dir):
    from ..checkpoints import checkpoint_runtime

    reason = _check(loaded, vcfg)
    if reason:
        raise QuasarError(f"verifier=checkpoint {reason}")
    return checkpoint_runtime(loaded.runtime, checkpoint_folder(loaded, vcfg))


# Not cached: the checkpoint already is the packed weights, read in seconds. Native only: the
# checkpoint's tensor names are mapped onto the native runtime's (checkpoints.py).
PRECISIONS = [Precision("checkpoint", _build, _params, check=_check, native_only=True)]
