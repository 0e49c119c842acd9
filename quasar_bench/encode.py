"""Prompt text -> token ids, the one way every part of the package does it.

A prompt is a list of user turns; a later turn is encoded after the earlier turns and the model's
own answers to them. A model with a chat template gets it (with `add_generation_prompt`, and
Qwen3's thinking switch from `model.enable_thinking`, off by default); a model without one gets
the turns and answers joined by newlines.
"""
from __future__ import annotations


def encode_turn(loaded, turns: list[str], answers: list[str] = ()) -> list[int]:
    """Token ids for the last of `turns`, after the earlier turns and the model's `answers`."""
    tok = loaded.tokenizer
    if getattr(loaded, "chat", False):
        messages = []
        for i, text in enumerate(turns):
            messages.append({"role": "user", "content": text})
            if i < len(answers):
                messages.append({"role": "assistant", "content": answers[i]})
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                      enable_thinking=bool(getattr(loaded, "enable_thinking", False)))
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    text = "".join(f"{q}\n{a}\n" for q, a in zip(turns, answers)) + turns[-1] + "\n"
    return list(tok(text)["input_ids"])


def decode_text(tokenizer, ids: list[int]) -> str:
    """Text of generated ids. A random-weight model with a larger vocabulary than its stand-in
    tokenizer (Qwen3-8B shapes, SmolLM2 tokenizer) can emit ids the tokenizer lacks: shown as <id>."""
    n = len(tokenizer)
    if all(i < n for i in ids):
        return tokenizer.decode(ids, skip_special_tokens=True)
    return "".join(tokenizer.decode([i], skip_special_tokens=True) if i < n else f"<{i}>" for i in ids)
