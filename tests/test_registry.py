"""The "how to add" checklists, enforced: every drafter, precision and kernel backend has its
config, its docs entry and its tests; nothing outside drafters/ names a drafter; drafters never
import upwards; a drafter and a backend kept outside the package plug in without editing it."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from quasar_bench import backends
from quasar_bench.decode import generate, greedy_continuation
from quasar_bench.drafters import drafter_names, make_drafter
from quasar_bench.models import LoadedModel
from quasar_bench.verifiers import build_verifier, verifier_names

from conftest import tiny_runtime

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "quasar_bench"


def _yaml_name(group, name):
    path = ROOT / "conf" / group / f"{name}.yaml"
    assert path.exists(), f"{name} has no conf/{group}/{name}.yaml"
    return yaml.safe_load(path.read_text())["name"]


@pytest.mark.parametrize("name", drafter_names())
def test_every_drafter_has_config_docs_and_lossless_test(name):
    assert _yaml_name("drafter", name) == name
    assert f"`{name}`" in (ROOT / "docs" / "drafters.md").read_text(), f"docs/drafters.md lacks `{name}`"
    assert f'"{name}"' in (ROOT / "tests" / "test_drafters.py").read_text(), \
        f"tests/test_drafters.py has no lossless case for {name}"


@pytest.mark.parametrize("name", verifier_names())
def test_every_precision_has_config_docs_and_test(name):
    assert _yaml_name("verifier", name) == name
    assert f"`{name}`" in (ROOT / "docs" / "verifiers.md").read_text(), f"docs/verifiers.md lacks `{name}`"
    assert f'"{name}"' in (ROOT / "tests" / "test_verifiers.py").read_text(), \
        f"tests/test_verifiers.py never builds {name}"


@pytest.mark.parametrize("name", backends.builtin_names())
def test_every_backend_is_a_backend_with_ops_and_a_test(name):
    b = backends.get_backend(name)
    assert b.name == name and any(b.supports(op) for op in backends.OPS)
    assert f'"{name}"' in (ROOT / "tests" / "test_backends.py").read_text(), f"no test compares {name}"


def _py_files(under: Path):
    return [p for p in under.rglob("*.py") if "__pycache__" not in p.parts]


def test_no_module_outside_drafters_names_a_drafter():
    names = set(drafter_names())
    offenders = []
    for path in _py_files(PKG):
        if "drafters" in path.relative_to(ROOT).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}")
    assert not offenders, offenders


def test_drafters_never_import_the_loop_or_the_harness():
    upward = {"decode", "run", "plan", "cell", "references", "rows", "summary", "store", "figures",
              "verifiers", "calibration", "cli_checks", "__main__"}
    bad = []
    for path in _py_files(PKG / "drafters"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level >= 2:
                mod = (node.module or "").split(".")[0]
                if mod in upward or (not mod and {a.name for a in node.names} & upward):
                    bad.append(f"{path.name}:{node.lineno} from {'.' * node.level}{node.module or ''}")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                full = node.module if isinstance(node, ast.ImportFrom) else None
                names = [full] if full else [a.name for a in node.names]
                bad += [f"{path.name}:{node.lineno} {n}" for n in names
                        if n and n.startswith("quasar_bench.") and n.split(".")[1] in upward]
    assert not bad, bad


TOY_DRAFTER = '''
from quasar_bench.drafters import Draft, Drafter


class Echo(Drafter):
    """Proposes the last k tokens of the context again (a deliberately weak drafter)."""
    name = "echo"

    def propose(self, context, k):
        return Draft(tokens=list(context[-k:]))
'''

TOY_BACKEND = '''
from quasar_kernels.reference import w4a16_linear_ref
from quasar_bench.backends import Backend


class Counting(Backend):
    """The reference int4 math, counting its calls (proves the quantized modules route here)."""
    name = "toy_counting"
    devices = ("cpu",)
    calls = 0

    def w4a16(self, mod, x):
        type(self).calls += 1
        return w4a16_linear_ref(x, mod.qweight, mod.scales, mod.zeros, mod.in_features, mod.group_size, mod.bias)


BACKEND = Counting()
'''


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    (tmp_path / "toy_drafter_mod.py").write_text(TOY_DRAFTER)
    (tmp_path / "toy_backend_mod.py").write_text(TOY_BACKEND)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_outside_drafter_is_lossless_and_runs_through_the_cli(plugins, tmp_path):
    _, rt = tiny_runtime("tiny_llama", vocab=256, seed=3)
    prompt = [5, 9, 5, 9, 5, 9, 11, 12]
    drafter = make_drafter({"name": "echo", "module": "toy_drafter_mod", "k": 3}, rt)
    spec = generate(rt, drafter, prompt, 24, 3)
    assert spec.output_ids == greedy_continuation(rt, prompt, 24)
    assert spec.drafted > 0
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": f"{plugins}{os.pathsep}{ROOT}", "QUASAR_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "quasar_bench", "model=tiny_llama", "verifier=reference",
                        "matrix.drafters=[ar,{name:echo,module:toy_drafter_mod,k:3}]", "dataset.limit=1",
                        "max_new_tokens=8", f"out_dir={out}", "progress=false", "repeats=1"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = pd.read_parquet(out / "rows.parquet")
    echo = rows[rows.drafter == "echo"]
    ar = rows[rows.drafter == "ar"]
    assert len(echo) and (echo.k == 3).all() and not echo.baseline.any() and ar.baseline.all()
    # greedy: the outside drafter's output is the AR output, prompt by prompt
    for (pid, turn), g in echo.groupby(["prompt_id", "turn"]):
        a = ar[(ar.prompt_id == pid) & (ar.turn == turn)].iloc[0]
        assert list(g.iloc[0].output_ids) == list(a.output_ids)


def test_outside_backend_serves_the_quantized_linears(plugins):
    hf, rt = tiny_runtime("tiny_llama", vocab=256, seed=4)
    loaded = LoadedModel(name="tiny", runtime=rt, tokenizer=None, eos_ids=[], chat=False)
    ref = build_verifier(loaded, {"name": "int4", "kernel": "reference"})
    toy = build_verifier(loaded, {"name": "int4", "kernel": "toy_backend_mod"})
    from toy_backend_mod import Counting

    before = Counting.calls
    ids = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    for r in (ref, toy):
        r.reset(16)
    torch.testing.assert_close(toy.forward(ids), ref.forward(ids), rtol=1e-5, atol=1e-5)
    assert Counting.calls - before == 7 * rt.num_layers  # every decoder linear, once


def test_unknown_or_unusable_backend_is_one_line():
    from quasar_bench.errors import QuasarError

    _, rt = tiny_runtime("tiny_llama", vocab=128, seed=5)
    loaded = LoadedModel(name="tiny", runtime=rt, tokenizer=None, eos_ids=[], chat=False)
    with pytest.raises(QuasarError, match="unknown verifier.kernel='nope'"):
        build_verifier(loaded, {"name": "int8", "kernel": "nope"})
    with pytest.raises(QuasarError, match="runs on cuda, not cpu"):
        build_verifier(loaded, {"name": "int8", "kernel": "triton"})
    with pytest.raises(QuasarError, match="has no effect on verifier bf16"):
        build_verifier(loaded, {"name": "bf16", "kernel": "reference"})


def test_docs_explain_the_architecture():
    text = (ROOT / "docs" / "architecture.md").read_text()
    for module in ("plan", "references", "cell", "rows", "encode", "fileio", "backends/", "verifiers/"):
        assert module in text
    readme = (ROOT / "README.md").read_text()
    assert "How to add" in readme or "how to add" in readme
