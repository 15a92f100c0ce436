import json
import subprocess
import sys

import pytest


@pytest.fixture
def run_cli(capsys):
    """Run ``loraplan ARGS`` in-process; returns (exit_code, stdout, stderr)."""
    from loraplan.cli import main

    def run(*args):
        code = main(list(args))
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


@pytest.fixture
def tiny_llama_config(tmp_path):
    """A tiny llama config.json written to a folder; returns the folder path."""
    cfg = {"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": 128, "tie_word_embeddings": False}
    d = tmp_path / "tiny-llama"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def run_module(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
