"""The native runtime against transformers, KV-cache rollback, and layer-subset forwards."""
import copy

import pytest
import torch
import torch.nn as nn

from quasar_bench.models import TINY_CONFIGS, random_hf_model
from quasar_bench.runtime import HFRuntime, native_from_hf

FAMILIES = {
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    # llama3-style rope scaling exercises a RoPE variant other than the default
    "llama3_rope": dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False,
                        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 64}),
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "qwen3": dict(model_type="qwen3", hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False),
    "mistral": dict(model_type="mistral", hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                    sliding_window=None),
}


def make(family, seed=0):
    hf = random_hf_model(FAMILIES[family], 300, torch.float32, "cpu", seed)
    # Random init leaves biases at 0 and norms at 1: perturb them so they are really compared.
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return hf, native_from_hf(hf, 256)


@pytest.mark.parametrize("family", FAMILIES)
def test_native_logits_match_transformers(family):
    hf, rt = make(family)
    ids = torch.randint(0, 300, (37,), generator=torch.Generator().manual_seed(1))
    ref = hf(ids[None]).logits[0].float()
    rt.reset(64)
    # chunked: a prefill, a 5-token verify block, then single tokens, as the decode loop feeds them
    out = torch.cat([rt.forward(ids[:25]), rt.forward(ids[25:30])] + [rt.forward(ids[i : i + 1]) for i in range(30, 37)])
    assert (out - ref).abs().max().item() < 1e-4
    if hf.config.model_type == "qwen2":
        assert rt.layers[0].self_attn.q_proj.bias is not None
    if hf.config.model_type == "qwen3":
        assert hasattr(rt.layers[0].self_attn, "q_norm")


def test_tied_embeddings_share_storage():
    _, rt = make("llama")
    assert rt.lm_head.weight.data_ptr() == rt.embed_tokens.weight.data_ptr()
    _, rt = make("qwen3")
    assert rt.lm_head.weight.data_ptr() != rt.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("runtime_kind", ["native", "hf"])
def test_kv_rollback_discards_rejected_positions(runtime_kind):
    hf, rt = make("qwen3", seed=3)
    if runtime_kind == "hf":
        rt = HFRuntime(hf)
    g = torch.Generator().manual_seed(2)
    prefix, rejected, accepted = (torch.randint(0, 300, (n,), generator=g) for n in (20, 6, 4))
    rt.reset(64)
    rt.forward(prefix)
    rt.forward(rejected)
    rt.rollback(20)
    assert rt.cache_len == 20
    after = rt.forward(accepted)
    rt.reset(64)
    fresh = rt.forward(torch.cat([prefix, accepted]))[20:]
    assert (after - fresh).abs().max().item() < 1e-4
    # and the rejected tokens did change the logits, so the test can tell
    rt.reset(64)
    polluted = rt.forward(torch.cat([prefix, rejected, accepted]))[26:]
    assert (polluted - fresh).abs().max().item() > 1e-3


def test_layer_subset_matches_transformers_with_layers_removed():
    hf, rt = make("llama", seed=5)
    keep = [0, 2]
    ids = torch.randint(0, 300, (12,), generator=torch.Generator().manual_seed(4))
    # Hand-built reference: the transformers model itself with layer 1 cut out.
    ref_model = copy.deepcopy(hf)
    ref_model.model.layers = nn.ModuleList(ref_model.model.layers[i] for i in keep)
    ref_model.config.num_hidden_layers = len(keep)
    for j, layer in enumerate(ref_model.model.layers):
        layer.self_attn.layer_idx = j
    ref = ref_model(ids[None]).logits[0]
    rt.reset(32)
    out = rt.forward(ids, layer_ids=keep)
    assert (out - ref).abs().max().item() < 1e-4
    rt.reset(32)
    assert (rt.forward(ids) - ref).abs().max().item() > 1e-3  # all layers differ from the subset
    pruned = rt.with_layers(keep)
    pruned.reset(32)
    assert (pruned.forward(ids) - ref).abs().max().item() < 1e-4
    assert pruned.num_layers == 2 and rt.num_layers == 3


def test_smollm2_native_matches_transformers(smollm2):
    from transformers import AutoModelForCausalLM

    from quasar_bench.fileio import cache_root
    from quasar_bench.models import smollm2_folder

    hf = AutoModelForCausalLM.from_pretrained(smollm2_folder(cache_root()), dtype=torch.float32).eval()
    ids = torch.randint(0, 49152, (40,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    rt = smollm2.runtime
    rt.reset(64)
    assert (rt.forward(ids) - ref).abs().max().item() < 1e-4
    assert rt.num_layers == 30 and rt.args.tie_word_embeddings


def test_static_shape_path_matches_eager():
    """The fixed-shape forward that CUDA graphs capture (positions as a tensor, attention over a
    padded span) computes the same logits as the eager path; checked here on the CPU."""
    _, rt = make("qwen3", seed=7)
    ids = torch.randint(0, 300, (30,), generator=torch.Generator().manual_seed(8))
    rt.reset(64)
    eager = torch.cat([rt.forward(ids[:24]), rt.forward(ids[24:])])
    rt.reset(64)
    rt.forward(ids[:24])
    # poison the slots the static path will write and the padded tail it must mask
    rt.k_cache[:, :, 24:].normal_()
    rt.v_cache[:, :, 24:].normal_()
    static = rt.static_forward(ids[24:], torch.arange(24, 30), span=64)
    assert (static - eager[24:]).abs().max().item() < 1e-4


def test_compiled_elementwise_equals_eager_and_stays_lossless():
    """torch.compile'd norms / RoPE / SiLU*mul / residual adds compute the same function (fp32, CPU),
    and greedy speculative decoding on them still equals AR on the eager path."""
    from quasar_bench import runtime as R
    from quasar_bench.decode import generate, greedy_continuation
    from quasar_bench.drafters import make_drafter

    hf = random_hf_model({**TINY_CONFIGS["tiny_qwen3"], "initializer_range": 0.3}, 256, torch.float32, "cpu", 7)
    rt = native_from_hf(hf, 256)
    ids = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3])
    rt.reset(32)
    eager = rt.forward(ids)
    prompt = [7, 8, 9, 7, 8, 9, 7, 8]
    ar = greedy_continuation(rt, prompt, 24)
    R.compile_elementwise(True)
    try:
        rt.reset(32)
        compiled = rt.forward(ids)
        spec = generate(rt, make_drafter({"name": "ngram", "k": 4}, rt), prompt, 24, 4)
    finally:
        R.compile_elementwise(False)
    assert R.Elementwise.rms_norm is R.rms_norm  # switched back
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert spec.output_ids == ar and spec.accepted > 0


def test_static_shape_path_runs_layer_subsets_like_eager():
    """The fixed-shape forward CUDA graphs capture for a self-speculative drafter's layer subset
    equals the eager forward over the same layers (logits, and the cache entries it writes)."""
    _, rt = make("qwen3", seed=9)
    ids = torch.randint(0, 300, (20,), generator=torch.Generator().manual_seed(10))
    keep = [0, 2]
    rt.reset(64)
    rt.forward(ids[:18])
    eager = rt.forward(ids[18:], layer_ids=keep)
    k_eager = rt.k_cache[:, :, 18:20].clone()
    rt.rollback(18)
    rt.k_cache[:, :, 18:].normal_()
    static = rt.static_forward(ids[18:], torch.arange(18, 20), span=64, layer_ids=keep)
    assert (static - eager).abs().max().item() < 1e-4
    assert torch.allclose(rt.k_cache[keep, :, 18:20], k_eager[keep], atol=1e-5)


@pytest.mark.parametrize("runtime_kind", ["native", "hf"])
def test_prefill_fills_the_cache_like_forward(runtime_kind):
    """prefill (no LM head) leaves the cache forward leaves: the next step's logits are equal."""
    hf, rt = make("llama", seed=5)
    if runtime_kind == "hf":
        rt = HFRuntime(hf)
    g = torch.Generator().manual_seed(4)
    prompt, step = torch.randint(0, 300, (17,), generator=g), torch.randint(0, 300, (3,), generator=g)
    rt.reset(32)
    assert rt.prefill(prompt) is None and rt.cache_len == 17
    after_prefill = rt.forward(step)
    rt.reset(32)
    rt.forward(prompt)
    after_forward = rt.forward(step)
    assert torch.equal(after_prefill, after_forward)
