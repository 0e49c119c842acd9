"""No drafter: plain autoregressive decoding, one verifier forward per token (the baseline)."""
from . import Draft, Drafter


class AR(Drafter):
    name = "ar"
    drafts = False

    def propose(self, context, k):
        return Draft(tokens=[])
