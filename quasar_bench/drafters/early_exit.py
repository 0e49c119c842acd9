"""Early exit: draft with the verifier's first L layers, its final norm and its LM head
(self-speculation as in LayerSkip, Elhoushi et al. 2024, without their early-exit training).

The first L layers compute exactly what the full model computes there, so the drafter runs on the
verifier's own KV cache and its keys/values for the verified prefix are exact. `threshold` stops
drafting when the drafter's top-1 probability falls below it (0 = always k).
"""
from __future__ import annotations

from ..errors import QuasarError
from .layerskip import LayerSkip


class EarlyExit(LayerSkip):
    name = "early_exit"

    def choose_layers(self, cfg) -> list[int]:
        n = self.runtime.num_layers
        layers = cfg.layers
        if layers is None:
            raise QuasarError(f"early_exit needs drafter.layers=L, the number of leading layers to draft with "
                              f"(1..{n})")
        try:
            layers = int(layers)
        except (TypeError, ValueError):
            raise QuasarError(f"drafter.layers={layers!r} must be an integer in 1..{n}") from None
        if not 1 <= layers <= n:
            raise QuasarError(f"drafter.layers={layers} is outside 1..{n} (the verifier has {n} layers)")
        self.skip = list(range(layers, n))
        return list(range(layers))
