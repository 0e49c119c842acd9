"""Rows are labelled with the model actually loaded (models.model_label), and a result set never
holds two sets of weights under one label (run.check_model_label)."""
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from quasar_bench.errors import QuasarError
from quasar_bench.fileio import write_json
from quasar_bench.models import model_label
from quasar_bench.run import check_model_label
from quasar_bench.store import ResultStore

HF = SimpleNamespace(config=SimpleNamespace(model_type="gemma3_text"))


@pytest.mark.parametrize("name,path,label", [
    ("smollm2", None, "smollm2"),                                   # the embedded model itself
    ("smollm2", "/models/gemma-3-1b-it", "gemma-3-1b-it (gemma3_text)"),  # its group, other weights
    ("hf", "/models/gemma-3-1b-it/", "gemma-3-1b-it (gemma3_text)"),
    ("hf", "google/gemma-3-1b-it", "gemma-3-1b-it (gemma3_text)"),     # a hub id: its last part
    ("my-gemma", "/models/gemma-3-1b-it", "my-gemma"),               # a name the user gave wins
])
def test_model_label_names_the_loaded_weights(name, path, label):
    assert model_label(OmegaConf.create({"name": name, "path": path}), HF) == label


def test_one_label_never_stands_for_two_sets_of_weights(tmp_path):
    store = ResultStore(tmp_path)
    check_model_label(store, "smollm2", "smollm2-aaaa")  # an empty out_dir: nothing to compare
    store.open({"identity": {"experiment": "x"}})
    write_json(tmp_path / "cells" / "c1.json", {"model_label": "smollm2", "weights": "smollm2-aaaa"})
    check_model_label(store, "smollm2", "smollm2-aaaa")  # the same weights: a resume
    check_model_label(store, "gemma-3-1b-it (gemma3_text)", "gemma-bbbb")  # another label: its own cells
    with pytest.raises(QuasarError, match="holds rows of model 'smollm2' with other weights.*model.name="):
        check_model_label(store, "smollm2", "smollm2-cccc")
    store.close()
