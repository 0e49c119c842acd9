"""The loaded model as it is (`reference`: fidelity is measured against it), or cast to a float dtype."""
from __future__ import annotations

import torch

from ..quant import cast_runtime, same_weights_runtime
from . import Precision

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _cast(dtype):
    return lambda loaded, vcfg, params, cache_dir: cast_runtime(loaded.runtime, dtype)


PRECISIONS = [Precision("reference", lambda loaded, vcfg, params, cache_dir: same_weights_runtime(loaded.runtime),
                        is_reference=True)]
PRECISIONS += [Precision(name, _cast(dtype)) for name, dtype in _DTYPES.items()]
