"""Every setup of the four seed documents (shared/seeds/) is expressible, with its published counts.

000 Databricks: OpenLLaMA-3B-v2 QLoRA/LoRA on an A100 80GB. 001 LanceDB: Llama-2-7B QLoRA
(nf4, no double quant, r64, alpha 16, dropout 0.1, paged AdamW 8-bit). 002 Raschka (LitGPT):
Llama-2-7B LoRA vs QLoRA, r8 -> r256, AdamW vs SGD, all layers. 003 Heidloff/Schmid:
FLAN-T5-XXL int8 LoRA r16 on q,v on an A10G.
"""

import json

import pytest

SEEDS = [
    # (seed, args, trainable, total or None)
    ("000 r8 q,v", ["--model", "open-llama-3b-v2", "--quant", "nf4", "--rank", "8", "--targets", "q_proj,v_proj",
                    "--gpu", "a100-sxm-80gb"], 2_662_400, None),
    ("000 r16 q,v", ["--model", "open-llama-3b-v2", "--quant", "nf4", "--rank", "16", "--targets", "q_proj,v_proj",
                     "--gpu", "a100-sxm-80gb"], 5_324_800, None),
    ("000 r8 all+lm_head", ["--model", "open-llama-3b-v2", "--quant", "nf4", "--rank", "8", "--targets",
                            "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head"], 12_994_560, None),
    ("000 8-bit LoRA", ["--model", "open-llama-3b-v2", "--quant", "int8", "--rank", "8", "--targets",
                        "all-linear,lm_head"], 12_994_560, None),
    ("001 QLoRA r64", ["--model", "llama-2-7b", "--quant", "nf4", "--no-double-quant", "--rank", "64", "--alpha", "16",
                       "--dropout", "0.1", "--optimizer", "paged_adamw_8bit", "--batch", "1"], 33_554_432, None),
    ("002 LoRA bf16 r8", ["--model", "llama-2-7b", "--quant", "bf16", "--rank", "8", "--alpha", "16",
                          "--targets", "q_proj,v_proj", "--gpu", "a100-sxm-80gb"], 4_194_304, 6_742_609_920),
    ("002 QLoRA r8 sgd", ["--model", "llama-2-7b", "--quant", "nf4", "--rank", "8", "--optimizer", "sgd"], 4_194_304, None),
    ("002 all layers", ["--model", "llama-2-7b", "--quant", "nf4", "--rank", "8", "--targets", "all-linear,lm_head"],
     20_277_248, None),
    ("002 r256 a512", ["--model", "llama-2-7b", "--quant", "nf4", "--rank", "256", "--alpha", "512",
                       "--targets", "all-linear", "--seq", "2048"], None, None),
    ("003 flan-t5-xxl", ["--model", "flan-t5-xxl", "--quant", "int8", "--rank", "16", "--alpha", "32",
                         "--targets", "q,v", "--gpu", "a10g-24gb"], 18_874_368, 11_154_206_720),
]


@pytest.mark.parametrize("name,args,trainable,total", SEEDS, ids=[s[0] for s in SEEDS])
def test_seed_setup_is_expressible(run_cli, name, args, trainable, total):
    code, out, err = run_cli("estimate", "--format", "json", *args)
    assert code == 0, err
    d = json.loads(out)
    if trainable is not None:
        assert d["params"]["trainable"] == trainable
    if total is not None:
        assert d["params"]["total"] == total
    assert d["memory"]["peak_allocated_bytes"] > 0


def test_seed_001_uses_peft_default_targets(run_cli):
    code, out, _ = run_cli("estimate", "--format", "json", "--model", "llama-2-7b")
    assert json.loads(out)["inputs"]["targets"] == ["q_proj", "v_proj"]
