"""Shared fixtures: the embedded SmolLM2 (loaded once per test session) and tiny random models."""
from __future__ import annotations

import os

import pytest
import torch
from omegaconf import OmegaConf

from quasar_bench.models import TINY_CONFIGS, load_model, random_hf_model
from quasar_bench.runtime import native_from_hf

# Every process the suite starts takes CPU products of 1+ rows on the packed weights: measured per
# process ("auto", quasar_kernels.reference.pack_min_rows), two processes on a noisy host could choose
# differently, and a run resumed by the second would then make new cells. The probe itself is tested
# with set timings (test_reference_linear.py).
os.environ.setdefault("QUASAR_CPU_PACK_MIN_ROWS", "1")


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny forwards only pay overhead (and contend) with more.
    A module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct, fp32 on CPU (converted from the GGUF once, then cached)."""
    return load_model(OmegaConf.create({"name": "smollm2", "device": "cpu", "dtype": "fp32"}))


def tiny_runtime(name: str = "tiny_llama", vocab: int = 512, seed: int = 0, max_len: int = 512):
    hf = random_hf_model(TINY_CONFIGS[name], vocab, torch.float32, "cpu", seed)
    return hf, native_from_hf(hf, max_len)


def chat_ids(loaded, text: str) -> list[int]:
    ids = loaded.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                               add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
