"""No drafter: plain autoregressive decoding, one verifier forward per token (the baseline)."""
from . import Draft, Drafter


class AR(Drafter):
    name = "ar"

    def __init__(self, cfg, runtime, loaded=None):
        super().__init__(cfg, runtime, loaded)
        self.k = 0  # k means nothing here; the loop never asks for drafts

    def propose(self, context, k):
        return Draft(tokens=[])
