"""The generic runtime: any transformers decoder-only causal LM behind the runtime interface of
runtime.py, with transformers' own modelling code and its DynamicCache.

Everything the verifiers and the self-speculative drafters need works here without touching the
modelling code of a family:

- Layer subsets (pruned verifiers, layerskip / early_exit drafts): a layer left out of a forward
  has its `forward` replaced, for that forward only, by the identity on its hidden states; it
  writes nothing to the KV cache. The cache keeps transformers' layer indices (each attention
  module still writes to its own `layer_idx`), so a later forward over every layer finds every
  layer's entries where it left them. `SubsetCache` sizes the attention masks from a layer that
  runs (transformers sizes them from the first full-attention / sliding layer, which may be one
  left out and so hold fewer positions).
- Rollback crops each cache layer to the kept length on its own (layers left out of drafting
  forwards hold fewer positions than the ones that ran). Sliding-window layers record their past
  (`activate_past_recording`), which is what lets them be cropped after the window fills.
- Quantized verifiers replace `nn.Linear` modules inside the model (quant.py): the kernels do not
  care which family the linear belongs to.

What stays on the native runtime only: CUDA graphs, fused projections and attention kernels, the
fp32 LM head of the fidelity pass (here the head runs in the model's dtype: exact on CPU fp32),
batch sizes above 1, and the checkpoint verifier.
"""
from __future__ import annotations

import functools
import inspect

import torch
import torch.nn as nn

from .errors import QuasarError


def decoder_layer_path(hf_model) -> str:
    """Dotted path (from the model) of the ModuleList of decoder layers: the one list of the model
    holding num_hidden_layers modules (model.layers, gpt_neox.layers, transformer.h, ...)."""
    n = hf_model.config.get_text_config(decoder=True).num_hidden_layers
    found = [name for name, mod in hf_model.named_modules() if isinstance(mod, nn.ModuleList) and len(mod) == n
             and name and all(isinstance(m, nn.Module) for m in mod)]
    found = [f for f in found if not any(f.startswith(g + ".") for g in found)]  # the outermost one
    if len(found) != 1:
        raise QuasarError(f"cannot tell the decoder layers of {type(hf_model).__name__} (lists of {n} modules: "
                          f"{found or 'none'}); this model is not a plain decoder-only causal LM")
    return found[0]


class SubsetCache:
    """Mixin over transformers' DynamicCache: while `active` (the layer indices a forward runs)
    is set, the mask sizes and the sequence length are read from a layer that runs, of the same
    kind (sliding or full) as the one asked for."""

    active: list[int] | None = None

    def _running(self, layer_idx: int) -> int:
        if self.active is None or layer_idx in self.active or layer_idx >= len(self.layers):
            return layer_idx
        sliding = getattr(self.layers[layer_idx], "is_sliding", False)
        same = [i for i in self.active if i < len(self.layers) and getattr(self.layers[i], "is_sliding", False) == sliding]
        return same[0] if same else layer_idx  # no running layer of that kind: its mask is not used

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return super().get_seq_length(self._running(layer_idx))

    def get_mask_sizes(self, query_length: int, layer_idx: int):
        return super().get_mask_sizes(query_length, self._running(layer_idx))


@functools.cache
def _subset_cache_class() -> type:
    from transformers import DynamicCache  # imported on first use: transformers is slow to import

    return type("SubsetDynamicCache", (SubsetCache, DynamicCache), {})


def subset_cache(config):
    """An empty DynamicCache (layer kinds from the config) that sizes masks from running layers."""
    cache = _subset_cache_class()(config=config)
    cache.activate_past_recording()  # sliding-window layers: keep what a rollback may need
    return cache


_RETURNS_TUPLE: dict[type, bool] = {}  # decoder layer class -> whether it returns (hidden, ...)


class HFRuntime(nn.Module):
    """Generic path: any transformers causal LM (see the module docstring). `layer_map` lists the
    model's layers this runtime runs, in order (all of them, or those a pruned verifier kept);
    runtime layer j is the model's layer layer_map[j]."""

    is_native = False

    def __init__(self, hf_model, layer_map: list[int] | None = None):
        super().__init__()
        self.model = hf_model.eval()
        self.layers_path = decoder_layer_path(hf_model)
        total = len(hf_model.get_submodule(self.layers_path))
        self.layer_map = list(range(total)) if layer_map is None else list(layer_map)
        self.cache = None
        self.cache_len = 0
        params = inspect.signature(hf_model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"  # transformers >= 5.2x: cache

    # -- what the transforms and drafters see --------------------------------------------------
    @property
    def all_layers(self) -> nn.ModuleList:
        return self.model.get_submodule(self.layers_path)

    @property
    def layers(self) -> list[nn.Module]:
        """The decoder layers this runtime runs (runtime numbering)."""
        every = self.all_layers
        return [every[i] for i in self.layer_map]

    @property
    def lm_head(self):
        return self.model.get_output_embeddings()

    def __setattr__(self, name, value):
        if name == "lm_head":  # a quantized head replaces the model's (a tied embedding stays as it is)
            self.model.set_output_embeddings(value)
            return
        super().__setattr__(name, value)

    @property
    def num_layers(self) -> int:
        return len(self.layer_map)

    @property
    def vocab_size(self) -> int:
        return self.model.config.get_text_config(decoder=True).vocab_size

    @property
    def device(self):
        return self.model.device

    @property
    def dtype(self):
        return self.model.dtype

    def state_dict(self, *args, **kwargs):
        """The weights this runtime computes with: the layers it leaves out are not part of it (a
        pruned runtime shares the model, all layers included)."""
        out = super().state_dict(*args, **kwargs)
        kept = set(self.layer_map)
        dropped = tuple(f"model.{self.layers_path}.{i}." for i in range(len(self.all_layers)) if i not in kept)
        return type(out)((k, v) for k, v in out.items() if not k.startswith(dropped)) if dropped else out

    def unused_tensors(self) -> set[int]:
        """ids of the weights of layers this runtime never runs (rows.weight_bytes leaves them out)."""
        keep = set(self.layer_map)
        return {id(t) for i, layer in enumerate(self.all_layers) if i not in keep
                for t in list(layer.parameters()) + list(layer.buffers())}

    # -- cache ---------------------------------------------------------------------------------
    def reset(self, max_len: int) -> None:
        self.cache = subset_cache(self.model.config)
        self.cache_len = 0

    def rollback(self, n: int) -> None:
        assert 0 <= n <= self.cache_len, (n, self.cache_len)
        for i, layer in enumerate(self.cache.layers):
            if not getattr(layer, "is_initialized", False):
                continue  # a layer this runtime never ran (pruned)
            held = layer.get_seq_length()
            if held < n:
                raise RuntimeError(f"cache layer {i} holds {held} positions, fewer than the {n} kept: a forward "
                                   "over a subset of layers was not rolled back before a full one")
            layer.crop(n - held)  # negative: remove that many (0 still trims a sliding layer's record)
        self.cache_len = n

    # -- forwards ------------------------------------------------------------------------------
    def _skip_fn(self, layer):
        cls = type(layer)
        if cls not in _RETURNS_TUPLE:
            seen = {}

            def record(mod, args, out):  # returns None: the output is left as it is
                seen.setdefault("tuple", isinstance(out, tuple))
            handle = layer.register_forward_hook(record)
            try:
                with torch.inference_mode():
                    self.model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=self.device), use_cache=False,
                               logits_to_keep=1)
            finally:
                handle.remove()
            _RETURNS_TUPLE[cls] = seen["tuple"]
        as_tuple = _RETURNS_TUPLE[cls]

        def skipped(hidden_states, *args, **kwargs):
            return (hidden_states, None) if as_tuple else hidden_states
        return skipped

    def _call(self, active: list[int], **kwargs):
        """The model's forward running only the model layers in `active` (the rest pass their input on)."""
        every, running = self.all_layers, set(active)
        left_out = [every[i] for i in range(len(every)) if i not in running]
        if self.cache is not None:
            self.cache.active = None if not left_out else active
        fns = [self._skip_fn(layer) for layer in left_out]
        for layer, fn in zip(left_out, fns):
            layer.forward = fn  # an instance attribute: this module only, until the finally
        try:
            return self.model(**kwargs)
        finally:
            for layer in left_out:
                del layer.forward
            if self.cache is not None:
                self.cache.active = None

    def _cached_call(self, input_ids, layer_ids=None, **kwargs):
        t = input_ids.shape[0]
        if self.cache is None:
            raise RuntimeError("reset(max_len) before the first forward")
        active = self.layer_map if layer_ids is None else [self.layer_map[j] for j in layer_ids]
        pos = torch.arange(self.cache_len, self.cache_len + t, device=input_ids.device)
        out = self._call(active, input_ids=input_ids[None], position_ids=pos[None], use_cache=True,
                         **{self._cache_kw: self.cache}, **kwargs)
        self.cache_len += t
        return out

    @torch.inference_mode()
    def forward(self, input_ids, layer_ids=None):
        return self._cached_call(input_ids, layer_ids).logits[0].float()

    def forward_fp32_head(self, input_ids):
        """forward(): on the generic path the final norm and LM head run in the model's dtype (the
        norm is the family's own), so a bf16 verifier's KL includes its head's rounding; on CPU
        fp32 it is exact."""
        return self.forward(input_ids)

    @torch.inference_mode()
    def prefill(self, input_ids) -> None:
        self._cached_call(input_ids, logits_to_keep=1)

    @torch.inference_mode()
    def hidden_states(self, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """[input of the first layer run, after each layer run] for one sequence, without the cache
        (calibration statistics: pruning's block influence, SmoothQuant's activation ranges)."""
        out, handles = [], []
        layers = self.layers

        def first_input(mod, args, kwargs):
            out.append((args[0] if args else kwargs["hidden_states"])[0])

        def output(mod, args, result):
            out.append((result[0] if isinstance(result, tuple) else result)[0])
        handles.append(layers[0].register_forward_pre_hook(first_input, with_kwargs=True))
        handles += [layer.register_forward_hook(output) for layer in layers]
        try:
            self.run_uncached(input_ids)
        finally:
            for h in handles:
                h.remove()
        return out

    @torch.inference_mode()
    def run_uncached(self, input_ids: torch.Tensor) -> None:
        """One forward of this runtime's layers over a sequence, without the cache and the logits
        (the hooks of calibration passes read what they need)."""
        self._call(self.layer_map, input_ids=input_ids[None], use_cache=False, logits_to_keep=1)

    # -- runtimes on the same weights ----------------------------------------------------------
    def sibling(self) -> "HFRuntime":
        """A runtime over these same weights with a cache of its own."""
        return HFRuntime(self.model, self.layer_map)

    def with_layers(self, keep: list[int]) -> "HFRuntime":
        """A runtime on the same model (no copy) that runs only its layers `keep` (pruning, a
        drafter's layer subset); the model's layer indices are kept, so the cache stays consistent."""
        return HFRuntime(self.model, [self.layer_map[j] for j in keep])
