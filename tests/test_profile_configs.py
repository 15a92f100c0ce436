"""Tiny llama-, qwen2- and t5-shaped configs for the profile tests (hidden 64, 2 layers, vocab 256)."""

import json
from pathlib import Path

TINY = {
    "llama": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
              "max_position_embeddings": 512, "tie_word_embeddings": False},
    "qwen2": {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
              "max_position_embeddings": 512, "tie_word_embeddings": True},
    "t5": {"model_type": "t5", "d_model": 64, "d_ff": 128, "d_kv": 16, "num_layers": 2, "num_decoder_layers": 2,
           "num_heads": 4, "vocab_size": 256, "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1},
}


def write_config(root: Path, kind: str) -> Path:
    """<root>/tiny-<kind>/config.json; returns the config.json path."""
    d = Path(root) / f"tiny-{kind}"
    d.mkdir(parents=True, exist_ok=True)
    p = d / "config.json"
    p.write_text(json.dumps(TINY[kind]))
    return p
