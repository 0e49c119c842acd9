"""Prompt encoding: model.enable_thinking reaches a Qwen3-style chat template."""
from omegaconf import OmegaConf

from quasar_bench.encode import encode_turn
from quasar_bench.models import load_model

# Qwen3's switch, reduced to what it does: thinking off pre-fills an empty <think></think> block.
TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}"
            "<|assistant|>{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
            "{% endif %}{% endif %}")


def test_enable_thinking_reaches_the_chat_template():
    import dataclasses

    loaded = load_model(OmegaConf.create({"name": "tiny_qwen3", "weights": "random", "shapes": "tiny_qwen3",
                                          "device": "cpu", "dtype": "fp32", "max_seq_len": 64,
                                          "enable_thinking": True}))
    loaded.tokenizer.chat_template = TEMPLATE
    on = loaded.tokenizer.decode(encode_turn(loaded, ["Hi"]))
    off = loaded.tokenizer.decode(encode_turn(dataclasses.replace(loaded, enable_thinking=False), ["Hi"]))
    assert off.endswith("<think>\n\n</think>\n\n") and "<think>" not in on and on.endswith("<|assistant|>")
