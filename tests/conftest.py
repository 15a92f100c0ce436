import json
import subprocess
import sys
from pathlib import Path

import pytest


def pytest_collection_modifyitems(config, items):
    """Skip tests marked ``gpu`` where torch sees no CUDA device."""
    gpu_items = [i for i in items if i.get_closest_marker("gpu")]
    if not gpu_items:
        return
    try:
        import torch

        ok = torch.cuda.is_available()
    except ImportError:
        ok = False
    if not ok:
        skip = pytest.mark.skip(reason="needs a CUDA GPU (marker 'gpu')")
        for item in gpu_items:
            item.add_marker(skip)


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


#: tiny llama-, qwen2- and t5-shaped configs for the profile tests (hidden 64, 2 layers, vocab 256)
TINY_CONFIGS = {
    "llama": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
              "max_position_embeddings": 512, "tie_word_embeddings": False},
    "qwen2": {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
              "max_position_embeddings": 512, "tie_word_embeddings": True},
    "t5": {"model_type": "t5", "d_model": 64, "d_ff": 128, "d_kv": 16, "num_layers": 2, "num_decoder_layers": 2,
           "num_heads": 4, "vocab_size": 256, "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1},
}


@pytest.fixture(scope="session")
def tiny_configs():
    """TINY_CONFIGS: kind (llama, qwen2, t5) -> config.json values."""
    return TINY_CONFIGS


def _write_tiny_config(root: Path, kind: str) -> Path:
    """<root>/tiny-<kind>/config.json; returns the config.json path."""
    d = Path(root) / f"tiny-{kind}"
    d.mkdir(parents=True, exist_ok=True)
    p = d / "config.json"
    p.write_text(json.dumps(TINY_CONFIGS[kind]))
    return p


@pytest.fixture(scope="session")
def write_tiny_config():
    """write_tiny_config(root, kind) -> path of a tiny config.json written under root."""
    return _write_tiny_config


def _profile_record(alloc, reserved=None, nvml_peak=None, status="ok", gpu="h100-sxm-80gb", seq=512, versions=None):
    """A record shaped like loraplan/profile/runner.make_record writes."""
    return {"schema": 1, "key": f"k{seq}{status}{gpu}", "label": f"qwen2.5-0.5b s{seq}",
            "inputs": {"model": "qwen2.5-0.5b", "model_type": "qwen2", "quant": "bf16", "double_quant": None,
                       "optimizer": "adamw", "batch": 1, "seq": seq, "target_seq": None,
                       "gradient_checkpointing": True, "attention": "auto", "int8_outlier_fraction": None,
                       "rank": 8, "alpha": 16, "dropout": 0.05, "targets": ["q_proj", "v_proj"],
                       "device": "cuda", "gpu_id": gpu},
            "status": status,
            "memory": {"peak_allocated_bytes": alloc, "peak_reserved_bytes": reserved,
                       "phases": {"lora": {"allocated_bytes": 1_000_000_000}}},
            "nvml": ({"available": True, "baseline_used_bytes": 10 * 2**20, "peak_used_bytes": nvml_peak}
                     if nvml_peak else {"available": False}),
            "time": {"step_s_median": 0.1} if status == "ok" else {},
            "env": {"device": "cuda", "gpu_name": "NVIDIA H100 80GB HBM3",
                    "versions": versions or {"torch": "2.11.0", "transformers": "5.17.0", "peft": "0.21.0",
                                             "bitsandbytes": "0.50.2", "loraplan": "0.1.0"}}}


def _write_jsonl(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


@pytest.fixture(scope="session")
def profile_record():
    """profile_record(alloc, reserved=None, nvml_peak=None, ...) -> a record like 'loraplan profile' writes."""
    return _profile_record


@pytest.fixture(scope="session")
def write_jsonl():
    """write_jsonl(path, records) -> path, one JSON record a line."""
    return _write_jsonl
