import pytest
import torch

from quasar_bench.errors import QuasarError
from quasar_bench.models import TINY_CONFIGS, LoadedModel, random_hf_model
from quasar_bench.pruning import block_influence, choose_layers, n_dropped
from quasar_bench.runtime import native_from_hf


def test_n_dropped_rounds_half_up_and_checks_range():
    assert n_dropped(0.25, 30) == 8  # 7.5 -> 8
    assert n_dropped(0.25, 4) == 1
    assert n_dropped(0.5, 4) == 2
    for bad in (0, 1, -0.5, 2, "x", None):
        with pytest.raises(QuasarError, match="share"):
            n_dropped(bad, 30)
    with pytest.raises(QuasarError, match="drops 0 of 4"):
        n_dropped(0.05, 4)


def test_choose_layers():
    assert choose_layers(8, 0.25, "last") == [0, 1, 2, 3, 4, 5]
    bi = [0.5, 0.1, 0.3, 0.05, 0.2, 0.4, 0.6, 0.7]
    assert choose_layers(8, 0.25, "block_influence", bi) == [0, 2, 4, 5, 6, 7]
    with pytest.raises(QuasarError, match="criterion"):
        choose_layers(8, 0.25, "random")


def test_block_influence_matches_definition():
    hf = random_hf_model(TINY_CONFIGS["tiny_llama"], 1000, torch.float32, "cpu", 0)
    rt = native_from_hf(hf, 256)
    seqs = [[1, 2, 3, 4, 5, 6], [7, 8, 9]]
    bi = block_influence(rt, seqs)
    assert len(bi) == rt.num_layers
    hs = [rt.hidden_states(torch.tensor(s)) for s in seqs]
    for i in range(rt.num_layers):
        vals = torch.cat([1 - torch.nn.functional.cosine_similarity(h[i], h[i + 1], dim=-1) for h in hs])
        assert abs(bi[i] - vals.mean().item()) < 1e-6
        assert 0 <= bi[i] <= 2
    keep = choose_layers(rt.num_layers, 0.5, "block_influence", bi)
    dropped = set(range(rt.num_layers)) - set(keep)
    assert max(bi[i] for i in dropped) <= min(bi[i] for i in keep)
    # the pruned runtime runs exactly the kept layers
    pruned = rt.with_layers(keep)
    ids = torch.tensor(seqs[0])
    with torch.inference_mode():  # as hidden_states runs: CPU linears of 3+ rows use oneDNN-packed weights only without autograd
        want = rt.run_layers(rt.embed_tokens(ids), 0, layer_ids=keep, use_cache=False)
    assert torch.equal(pruned.hidden_states(ids)[-1], want)
    LoadedModel  # imported for symmetry with other tests
