"""The result row: one (cell, prompt, turn, repeat), its schema in one place."""
from __future__ import annotations

import math
import os
import platform
import resource
from dataclasses import dataclass, field

import torch

from .metrics import alpha, per_position_acceptance, tau


@dataclass
class Cell:
    """One (verifier, drafter) cell of a run, with what every row of it shares."""
    cell_id: str
    context_id: str  # the identity without drafter and verifier: cells comparable with each other
    config: dict  # the full resolved configuration: the cell's identity
    experiment: str
    model: str  # the loaded model's label (models.model_label)
    model_weights: str  # <label>-<weights fingerprint>: which weights the label stood for
    verifier: str  # label
    drafter: str  # label
    drafter_name: str
    is_reference: bool
    baseline: bool  # the drafter drafts nothing (plain AR)
    forced_acceptance: bool
    k: int
    batch_size: int  # sequences per verify forward (decode.generate_batch)
    batch_packed: bool  # its batched forwards ran their linears on real tokens only (batching.py)
    kernel: str  # kernel backend of the quantized linears ("" when there are none)
    temperature: float
    top_p: float
    device: str
    dtype: str
    weight_bytes: int
    git_commit: str
    drafter_fields: dict = field(default_factory=dict)  # the drafter's row_fields(): extra columns
    runtime: str = "native"  # which engine timed it: native (runtime.py) or generic (generic_runtime.py)


def make_row(cell: Cell, prompt, turn: int, prompt_ids: list[int], res, text: str, seed: int, peak: int,
             repeat: int = 0, timed_at: float = math.nan) -> dict:
    """`repeat`: which timing of this (cell, prompt, turn) the row is (0, 1, ...); `timed_at`: the
    wall-clock time (Unix seconds) its timed generation began, for reading drift over a run."""
    n = len(res.output_ids)
    row = {
        "experiment": cell.experiment, "cell_id": cell.cell_id, "context_id": cell.context_id, "model": cell.model,
        "model_weights": cell.model_weights,
        "drafter": cell.drafter, "drafter_name": cell.drafter_name, "verifier": cell.verifier,
        "reference_verifier": cell.is_reference, "baseline": cell.baseline,
        "forced_acceptance": cell.forced_acceptance, "kernel": cell.kernel, "k": cell.k,
        "batch_size": cell.batch_size, "batch_packed": cell.batch_packed,
        "temperature": cell.temperature, "top_p": cell.top_p,
        "dataset": prompt.dataset, "category": prompt.category, "prompt_id": str(prompt.prompt_id), "turn": turn,
        "repeat": int(repeat), "timed_at": float(timed_at),
        "prompt_tokens": len(prompt_ids), "new_tokens": n, "verify_steps": res.verify_steps,
        "tau": tau(n, res.verify_steps), "alpha": alpha(res.accepted, res.drafted),
        "accepted_per_position": per_position_acceptance(res.attempts, res.accepts),
        "drafted": res.drafted, "accepted": res.accepted, "stopped_by": res.stopped_by,
        "drafted_lengths": list(res.step_drafted), "accepted_lengths": list(res.step_accepted),
        "prefill_s": res.prefill_s, "decode_s": res.decode_s, "draft_s": res.draft_s,
        "verify_s": res.verify_s, "other_s": res.decode_s - res.draft_s - res.verify_s,
        "tokens_per_s": n / res.decode_s if res.decode_s > 0 else math.nan,
        **batch_columns(res),
        "peak_mem_bytes": int(peak), "weight_bytes": cell.weight_bytes, "prompt_ids": list(prompt_ids),
        "output_ids": res.output_ids, "output_text": text, "seed": seed, "device": cell.device,
        "dtype": cell.dtype, "runtime": cell.runtime, "torch_version": torch.__version__, "git_commit": cell.git_commit,
    }
    clash = sorted(set(cell.drafter_fields) & set(row))
    if clash:
        raise ValueError(f"drafter {cell.drafter_name}: row_fields() {clash} clash with the row schema")
    return {**row, **cell.drafter_fields}


def batch_columns(res) -> dict:
    """What a row's batch shared (batch_size 1 included: a batch of one). decode_s is the
    sequence's own latency (first verify step to its last token); the batch's throughput is
    Σ new_tokens / Σ throughput_share_s over a cell's rows (each row holds its share of its
    batch's wall time), M the rows of each verify GEMM (padding included). batch_padding: the share
    of those GEMM rows that were padding; attention_padding: the share of the [B, T] positions
    attention ran on that were (equal, unless the batch packs its linears: batch_packed)."""
    b = res.batch
    return {"batch_members": b.members, "batch_steps": b.steps, "batch_decode_s": b.decode_s,
            "batch_new_tokens": b.new_tokens, "throughput_share_s": b.decode_s / b.members,
            "batch_tokens_per_s": b.new_tokens / b.decode_s if b.decode_s > 0 else math.nan,
            "gemm_rows_per_step": b.gemm_rows / b.steps if b.steps else math.nan,
            "batch_padding": 1 - b.real / b.gemm_rows if b.gemm_rows else math.nan,
            "attention_padding": 1 - b.real / b.fed if b.fed else math.nan}


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # process peak RSS (never decreases)


def weight_bytes(runtime) -> int:
    """Bytes of weights one full forward reads: every parameter and buffer except the embedding
    table (a forward gathers only its rows; counted once when tied to lm_head), the RoPE tables
    and the KV cache. Divided by the verify time, it gives the bandwidth a step achieves."""
    module = getattr(runtime, "model", runtime)
    seen, total = set(), 0
    embed = module.get_input_embeddings() if hasattr(module, "get_input_embeddings") else getattr(module, "embed_tokens", None)
    head = getattr(runtime, "lm_head", None)
    skip = {id(embed.weight)} if embed is not None and head is not None \
        and getattr(head, "weight", None) is not embed.weight else set()
    if hasattr(runtime, "unused_tensors"):  # a pruned generic runtime shares the model, all layers included
        skip |= runtime.unused_tensors()
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if id(t) in seen or id(t) in skip or "rope" in name:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def resident_weight_bytes(runtime) -> int:
    """Bytes of every copy of the weights the runtime holds: its parameters and buffers (the
    embedding included; RoPE tables and KV cache not), what kernel backends derived from packed
    weights and keep on the modules (`prepared`: re-layouts such as the CUDA kernels' two int4
    layouts, the CPU reference backend's dequantized fp32 weights) and the CPU's oneDNN-packed
    copies. weight_bytes is what a forward reads; this is what the verifier costs in memory."""
    from quasar_kernels.reference import packed_copy

    module = getattr(runtime, "model", runtime)
    seen, total = set(), 0

    def add(t) -> None:
        nonlocal total
        if isinstance(t, torch.Tensor):
            if id(t) in seen:
                return
            seen.add(id(t))
            total += t.numel() * t.element_size()
            if (packed := packed_copy(t)) is not None:
                add(packed)
        elif isinstance(t, dict):
            for v in t.values():
                add(v)
        elif isinstance(t, (list, tuple)):
            for v in t:
                add(v)

    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if "rope" not in name:
            add(t)
    for m in module.modules():
        add(getattr(m, "prepared", None))
    return total


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"
