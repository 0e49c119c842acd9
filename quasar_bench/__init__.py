"""quasar_bench: a benchmark harness for the verify pass of speculative decoding."""

__version__ = "0.1.0"
