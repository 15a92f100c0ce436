"""--config: recipes read from TRL / Transformers / axolotl config files (loraplan.recipes).

Every key of a file is used, ignored with a reason, or refused with one line (exit 2); the
library's defaults fill what the file leaves unset; the command line overrides the file; each
example under examples/ reproduces its seed recipe field by field.
"""

import dataclasses
import json
from pathlib import Path

import pytest

from loraplan.case import resolve_case
from loraplan.recipes import NO_EFFECT, load_recipe
from loraplan.targets import default_targets
from loraplan.trainers import resolve_recipe

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

TRL_YAML = """\
# trl sft --config (flat: SFTConfig + ModelConfig + ScriptArguments)
model_name_or_path: Qwen/Qwen2.5-0.5B
dataset_name: trl-lib/Capybara
learning_rate: 2.0e-4
num_train_epochs: 1
packing: true
max_length: 2048
per_device_train_batch_size: 2
gradient_accumulation_steps: 8
eos_token: <|im_end|>
logging_steps: 25
use_peft: true
lora_r: 32
lora_alpha: 16
lora_target_modules: all-linear
load_in_4bit: true
dtype: bfloat16
output_dir: Qwen2.5-0.5B-SFT
"""

AXOLOTL_YAML = """\
base_model: openlm-research/open_llama_3b_v2
model_type: LlamaForCausalLM
tokenizer_type: LlamaTokenizer
load_in_8bit: false
load_in_4bit: true
strict: false
datasets:
  - path: teknium/GPT4-LLM-Cleaned
    type: alpaca
val_set_size: 0.02
adapter: qlora
sequence_len: 1024
sample_packing: true
lora_r: 8
lora_alpha: 16
lora_dropout: 0.0
lora_target_linear: true
lora_fan_in_fan_out:
output_dir: ./outputs/qlora-out
gradient_accumulation_steps: 2
micro_batch_size: 2
num_epochs: 4
optimizer: paged_adamw_32bit
lr_scheduler: cosine
learning_rate: 0.0002
bf16: true
fp16: false
tf32: false
gradient_checkpointing: true
flash_attention: true
xformers_attention:
deepspeed:
fsdp:
warmup_steps: 20
weight_decay: 0.1
"""


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text if isinstance(text, str) else json.dumps(text))
    return p


def _specs(path, **cli):
    """The specs a file resolves to (as estimate would build them), with ``cli`` options on top."""
    recipe = load_recipe(path, model_given="model" in cli)
    case = {**recipe.options, **cli}
    model, lora, train = resolve_case(case)
    return recipe, model, lora, resolve_recipe(train)


def test_trl_yaml_flat(tmp_path):
    recipe, model, lora, train = _specs(_write(tmp_path, "sft.yaml", TRL_YAML))
    assert recipe.kind == "trl" and train.trainer == "trl"
    assert model.name == "qwen2.5-0.5b"
    assert (lora.rank, lora.alpha, lora.dropout, lora.targets) == (32, 16.0, 0.05, ("all-linear",))  # dropout: ModelConfig
    assert (train.quant, train.double_quant, train.compute_dtype, train.load_dtype) == ("nf4", False, "bf16", "bf16")
    assert (train.batch, train.gradient_accumulation, train.seq) == (2, 8, 2048)
    assert train.padding == "padding-free"  # trl 1.16: bfd packing turns on padding_free
    assert train.gradient_checkpointing is True  # SFTConfig's default
    assert train.mixed_precision == "bf16"  # SFTConfig: bf16 unless fp16
    ignored = dict(recipe.ignored)
    assert ignored["learning_rate"] == NO_EFFECT and ignored["dataset_name"].startswith(NO_EFFECT)
    assert {k for k, _, _ in recipe.used} >= {"lora_r", "lora_alpha", "per_device_train_batch_size", "load_in_4bit"}


def test_loraplan_section_wins_over_the_file(tmp_path):
    """A ``loraplan:`` section states case options outright; they replace what the file's keys imply."""
    p = _write(tmp_path, "sft.yaml", TRL_YAML + "loraplan:\n  seq: 4096\n  quant: bf16\n  gpu: l4-24gb\n")
    recipe, _, _, train = _specs(p)
    assert (train.seq, train.quant, recipe.options["gpu"]) == (4096, "bf16", "l4-24gb")
    assert ("loraplan.seq", 4096, "--seq 4096 (instead of 2048 from the file)") in recipe.used


def test_trl_defaults_are_the_libraries(tmp_path):
    """Keys left out take trl's defaults, not loraplan's: ModelConfig dtype float32, lora_r 16, max_length 1024."""
    p = _write(tmp_path, "min.yaml", "model_name_or_path: Qwen/Qwen2.5-0.5B\nuse_peft: true\nload_in_4bit: true\n")
    recipe, _, lora, train = _specs(p)
    assert (lora.rank, lora.alpha) == (16, 32.0)
    assert (train.seq, train.batch, train.double_quant, train.load_dtype, train.compute_dtype) == (1024, 8, False, "fp32", "fp32")
    assert {o for o, _, _ in recipe.defaults} >= {"rank", "alpha", "seq", "batch", "double_quant", "load_dtype"}


def test_training_arguments_json_with_sections(tmp_path):
    data = {
        "model": {"pretrained_model_name_or_path": "meta-llama/Llama-2-7b-hf", "dtype": "bfloat16",
                  "attn_implementation": "flash_attention_2"},
        "BitsAndBytesConfig": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                               "bnb_4bit_compute_dtype": "torch.bfloat16", "quant_method": "bitsandbytes"},
        "LoraConfig": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": ["q_proj", "k_proj"],
                       "bias": "none", "task_type": "CAUSAL_LM", "peft_type": "LORA", "modules_to_save": None},
        "TrainingArguments": {"output_dir": "out", "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
                              "bf16": True, "optim": "adamw_bnb_8bit", "max_grad_norm": 0.3,
                              "gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": True},
                              "logging_steps": 10, "save_strategy": "epoch", "fsdp": [], "deepspeed": None},
        "tokenizer": {"max_length": 1024, "padding": "max_length", "truncation": True},
    }
    recipe, model, lora, train = _specs(_write(tmp_path, "args.json", data))
    assert recipe.kind == "hf" and train.trainer == "hf"
    assert model.name == "llama-2-7b"
    assert (lora.rank, lora.alpha, lora.dropout, lora.targets) == (16, 32.0, 0.05, ("q_proj", "k_proj"))
    assert (train.quant, train.double_quant, train.compute_dtype, train.load_dtype) == ("nf4", True, "bf16", "bf16")
    assert (train.batch, train.gradient_accumulation, train.seq, train.padding) == (4, 2, 1024, "max-length")
    assert (train.mixed_precision, train.optimizer, train.max_grad_norm) == ("bf16", "adamw_8bit", 0.3)
    assert (train.gradient_checkpointing, train.reentrant, train.attn_implementation) == (True, True, "flash_attention_2")
    assert "TrainingArguments.fsdp" in dict(recipe.ignored)


def test_hf_defaults_are_trainingarguments(tmp_path):
    """TrainingArguments' defaults: batch 8, no checkpointing, BitsAndBytesConfig fp4 without double quant."""
    p = _write(tmp_path, "a.json", {"model": {"pretrained_model_name_or_path": "llama-2-7b"},
                                    "bnb": {"load_in_4bit": True}, "args": {"output_dir": "x"}})
    _, _, _, train = _specs(p)
    assert (train.batch, train.gradient_checkpointing, train.quant, train.double_quant) == (8, False, "fp4", False)
    assert (train.trainer, train.mixed_precision, train.max_grad_norm) == ("hf", "no", 1.0)


def test_axolotl_yaml(tmp_path):
    recipe, model, lora, train = _specs(_write(tmp_path, "axolotl.yml", AXOLOTL_YAML))
    assert recipe.kind == "axolotl" and train.trainer == "hf"  # AxolotlTrainer is a transformers.Trainer
    assert model.name == "open-llama-3b-v2"
    assert (lora.rank, lora.alpha, lora.dropout, lora.targets) == (8, 16.0, 0.0, ("all-linear",))
    assert (train.quant, train.double_quant, train.compute_dtype, train.load_dtype) == ("nf4", True, "bf16", "bf16")
    assert (train.batch, train.gradient_accumulation, train.seq, train.padding) == (2, 2, 1024, "packing")
    assert (train.mixed_precision, train.optimizer, train.attn_implementation) == ("bf16", "paged_adamw_32bit",
                                                                                  "flash_attention_2")
    assert (train.gradient_checkpointing, train.reentrant, train.prepare_kbit) == (True, False, True)
    ignored = dict(recipe.ignored)
    assert ignored["learning_rate"] == NO_EFFECT and ignored["deepspeed"].startswith("off")
    assert "xformers_attention" in ignored


def test_cli_overrides_the_file(run_cli, tmp_path):
    p = _write(tmp_path, "sft.yaml", TRL_YAML)
    code, out, err = run_cli("estimate", "--config", str(p), "--rank", "64", "--seq", "512", "--format", "json")
    assert code == 0, err
    d = json.loads(out)
    assert (d["inputs"]["rank"], d["inputs"]["seq"], d["inputs"]["alpha"]) == (64, 512, 16.0)
    assert d["inputs"]["trainer"] == "trl" and d["inputs"]["batch"] == 2
    cfg = d["inputs"]["config"]
    assert cfg["kind"] == "trl" and set(cfg["overridden_by_command_line"]) == {"rank", "seq"}
    assert {i["key"] for i in cfg["ignored"]} >= {"learning_rate", "output_dir", "logging_steps"}
    assert err == ""  # the account is in the JSON, stdout is clean JSON


def test_table_output_lists_keys_on_stderr(run_cli, tmp_path):
    p = _write(tmp_path, "sft.yaml", TRL_YAML)
    code, out, err = run_cli("estimate", "--config", str(p), "--trainer", "hf")
    assert code == 0, err
    assert "used     lora_r = 32 -> --rank 32" in err
    assert f"ignored  learning_rate: {NO_EFFECT}" in err
    assert "the command line overrides: --trainer" in err
    assert "qwen2.5-0.5b" in out


@pytest.mark.parametrize("text, named", [
    (TRL_YAML + "lora_rank: 8\n", "unknown key 'lora_rank'"),
    (TRL_YAML + "optim: adafactor\n", "optim adafactor has no loraplan equivalent"),
    (TRL_YAML + "torch_compile: true\n", "torch_compile true"),
    (TRL_YAML.replace("use_peft: true\n", ""), "use_peft"),
    (AXOLOTL_YAML + "sequence_parallel_degree: 2\n", "sequence_parallel_degree 2"),
    (AXOLOTL_YAML.replace("load_in_4bit: true", "load_in_4bit: false"), "adapter qlora without load_in_4bit"),
    (AXOLOTL_YAML.replace("lora_r: 8", "lora_r: eight"), "lora_r eight must be a positive integer"),
    (AXOLOTL_YAML.replace("lora_dropout: 0.0", "lora_dropout: 1.5"), "lora_dropout 1.5: --dropout 1.5 must be in [0, 1)"),
    ("model_name_or_path: someone/unknown-model\nuse_peft: true\n", "give --model"),
    ("- a\n- list\n", "not a mapping"),
    ("a: [unclosed\n", "not valid YAML"),
])
def test_bad_keys_and_values_exit_2_with_one_line(run_cli, tmp_path, text, named):
    p = _write(tmp_path, "bad.yaml", text)
    code, out, err = run_cli("estimate", "--config", str(p))
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], err


def test_unknown_model_is_fine_with_model_option(run_cli, tmp_path):
    p = _write(tmp_path, "m.yaml", "model_name_or_path: someone/unknown-model\nuse_peft: true\n")
    code, out, err = run_cli("estimate", "--config", str(p), "--model", "tiny-llama", "--format", "json")
    assert code == 0, err
    d = json.loads(out)
    assert d["inputs"]["model"] == "tiny-llama"
    assert any(i["key"] == "model_name_or_path" for i in d["inputs"]["config"]["ignored"])


@pytest.mark.parametrize("command", [["plan"], ["sweep", "--out", "{tmp}/s.csv"],
                                     ["report", "compare", "--out", "{tmp}/r"]])
def test_other_commands_take_config(run_cli, tmp_path, command):
    pytest.importorskip("matplotlib") if command[0] == "report" else None
    args = [a.replace("{tmp}", str(tmp_path)) for a in command]
    code, out, err = run_cli(*args, "--config", str(EXAMPLES / "openllama-3b-qlora-r8-qv.yaml"))
    assert code == 0, err
    assert "config " in err and "trl recipe -> --trainer trl" in err
    if command[0] == "plan":  # plan ranks its own GPU list: the file's GPU is named as not used, not dropped
        assert "not used by this command: --gpu a100-sxm-80gb" in err


# ---- the seed recipes (examples/) ----

def test_example_llama2_7b_qlora_trainer():
    """Seed 001: r64 a16 dropout 0.1 (q,v by PEFT default), paged 8-bit AdamW, batch 1 x 4, fp16 autocast,
    reentrant checkpointing, nf4 compute bf16 without double quant, Trainer."""
    recipe, model, lora, train = _specs(EXAMPLES / "llama2-7b-qlora-trainer.yaml")
    assert model.name == "llama-2-7b"
    assert "targets" not in recipe.options  # the seed's LoraConfig names none: PEFT's default for llama
    assert (lora.rank, lora.alpha, lora.dropout, lora.targets) == (64, 16.0, 0.1, default_targets(model))
    assert default_targets(model) == ("q_proj", "v_proj")
    assert (train.trainer, train.mixed_precision, train.optimizer) == ("hf", "fp16", "paged_adamw_8bit")
    assert (train.batch, train.gradient_accumulation, train.max_grad_norm) == (1, 4, 1.0)
    assert (train.quant, train.double_quant, train.compute_dtype, train.load_dtype) == ("nf4", False, "bf16", "fp32")
    assert (train.gradient_checkpointing, train.reentrant, train.prepare_kbit) == (True, True, True)


@pytest.mark.parametrize("name, rank, targets, trainable", [
    ("openllama-3b-qlora-r8-qv.yaml", 8, ("q_proj", "v_proj"), 2_662_400),
    ("openllama-3b-qlora-r16-qv.yaml", 16, ("q_proj", "v_proj"), 5_324_800),
    ("openllama-3b-qlora-r8-all-linear.yaml", 8, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj",
                                                  "up_proj", "lm_head"), 12_994_560),
])
def test_examples_openllama_3b_qlora(name, rank, targets, trainable):
    """Seed 000: the three QLoRA runs on one A100 (trainable counts as the blog prints them)."""
    from loraplan.estimate.api import estimate

    recipe, model, lora, train = _specs(EXAMPLES / name)
    assert model.name == "open-llama-3b-v2" and recipe.options["gpu"] == "a100-sxm-80gb"
    assert (lora.rank, lora.alpha, lora.dropout, lora.targets) == (rank, 8.0, 0.05, targets)
    assert (train.trainer, train.mixed_precision, train.optimizer) == ("trl", "fp16", "adamw")
    assert (train.batch, train.gradient_accumulation, train.max_grad_norm, train.seq) == (4, 4, 0.3, 256)
    assert (train.quant, train.double_quant, train.compute_dtype, train.load_dtype) == ("nf4", True, "bf16", "fp32")
    assert (train.gradient_checkpointing, train.prepare_kbit, train.adapter_dtype) == (False, False, "fp32")
    assert estimate(model, lora, train, with_time=False).params.trainable == trainable


def test_example_flan_t5_xxl_int8():
    """Seed 003: flan-t5-xxl int8, r16 a32 dropout 0.05 on q,v (18,874,368 trainable), Seq2SeqTrainer, A10G."""
    from loraplan.estimate.api import estimate

    recipe, model, lora, train = _specs(EXAMPLES / "flan-t5-xxl-int8-lora-seq2seq.yaml")
    assert model.name == "flan-t5-xxl" and model.is_encoder_decoder and recipe.options["gpu"] == "a10g-24gb"
    assert (lora.rank, lora.alpha, lora.dropout, lora.targets) == (16, 32.0, 0.05, ("q", "v"))
    assert (train.trainer, train.quant, train.load_dtype, train.prepare_kbit) == ("hf", "int8", "fp32", True)
    assert (train.gradient_checkpointing, train.reentrant, train.mixed_precision) == (True, True, "no")
    assert (train.batch, train.seq, train.target_seq, train.optimizer) == (8, 255, 50, "adamw")
    assert estimate(model, lora, train, with_time=False).params.trainable == 18_874_368


def test_example_litgpt_llama2_7b_qlora():
    """Seed 002: lit-gpt's loop, Llama 2 7B nf4 (no double quant), bf16-true, r8 a16 on q,v (4,194,304
    trainable), bnb PagedAdamW, chunked cross-entropy (read as the standard loss), no checkpointing, rows of 1,304 tokens."""
    from loraplan.estimate.api import estimate

    recipe, model, lora, train = _specs(EXAMPLES / "litgpt-llama2-7b-qlora.yaml")
    assert recipe.kind == "loraplan" and model.name == "llama-2-7b"
    assert (lora.rank, lora.alpha, lora.dropout, lora.targets) == (8, 16.0, 0.05, ("q_proj", "v_proj"))
    assert (train.trainer, train.mixed_precision, train.load_dtype, train.adapter_dtype) == ("loop", "no", "bf16", "bf16")
    assert (train.quant, train.double_quant, train.compute_dtype, train.prepare_kbit) == ("nf4", False, "bf16", False)
    assert (train.optimizer, train.loss, train.gradient_checkpointing, train.max_grad_norm) == (
        "paged_adamw_32bit", "standard", False, 0.0)
    assert (train.batch, train.seq) == (1, 1304)
    assert estimate(model, lora, train, with_time=False).params.trainable == 4_194_304


def test_every_example_loads_from_the_cli(run_cli):
    files = sorted(EXAMPLES.glob("*.yaml"))
    assert len(files) == 6
    for f in files:
        code, out, err = run_cli("estimate", "--config", str(f), "--format", "json")
        assert code == 0, (f, err)
        assert json.loads(out)["inputs"]["config"]["path"] == str(f)


# ---- the vocabulary covers the installed libraries ----

def _field_defaults(cls) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
        else:
            out[f.name] = None
    return out


def test_every_field_of_the_installed_configs_is_known(tmp_path):
    """Each field of TrainingArguments, SFTConfig, ModelConfig, ScriptArguments, LoraConfig and
    BitsAndBytesConfig, at its default, is used or ignored with a reason: none is unknown."""
    trl = pytest.importorskip("trl")
    peft = pytest.importorskip("peft")
    import inspect
    from enum import Enum

    from transformers import BitsAndBytesConfig, Seq2SeqTrainingArguments

    def dump(d):
        p = tmp_path / "all.json"
        p.write_text(json.dumps(d, default=lambda o: o.value if isinstance(o, Enum) else str(o)))
        return p

    for cls in (Seq2SeqTrainingArguments, trl.SFTConfig, trl.ModelConfig, trl.ScriptArguments, peft.LoraConfig):
        d = _field_defaults(cls)
        d.update(model_name_or_path="Qwen/Qwen2.5-0.5B", use_peft=True, bf16=False)
        recipe = load_recipe(dump(d))
        accounted = {k for k, _, _ in recipe.used} | {k for k, _ in recipe.ignored}
        assert not set(d) - accounted - {"bf16", "fp16", "dtype", "load_in_4bit", "load_in_8bit", "use_peft",
                                         "bnb_4bit_quant_type", "use_bnb_nested_quant", "packing",
                                         "packing_strategy", "padding_free", "loss_type"}, cls
    bnb = {k: p.default for k, p in inspect.signature(BitsAndBytesConfig.__init__).parameters.items()
           if k not in ("self", "kwargs")}
    bnb.update(load_in_4bit=True, bnb_4bit_compute_dtype="bfloat16")
    recipe = load_recipe(dump({"model": {"pretrained_model_name_or_path": "llama-2-7b"}, "bnb": bnb}))
    assert recipe.options["quant"] == "fp4" and recipe.options["double_quant"] is False


def test_published_stack_benchmark_predicts_every_case():
    """benchmarks/published_stack.py: every published case resolves to specs and gets a prediction."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "published_stack.py"
    spec = importlib.util.spec_from_file_location("published_stack", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cases = json.loads(mod.DATA.read_text())["cases"]
    assert len(cases) == 15
    for c in cases:
        assert c["source"]["url"] and c["differs"] and "value" in c["published"]
        row = mod.predict(c)
        assert row["predicted"] and row["predicted"] > 0 and row["ratio"] > 0, row


def test_published_memory_pairs_are_predicted():
    """benchmarks/published_stack.py: the cases whose source also published NVML (published-memory.json)
    get predicted allocated <= reserved <= device total, next to the published pair."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "published_stack.py"
    spec = importlib.util.spec_from_file_location("published_stack", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.memory_pairs(json.loads(mod.DATA.read_text())["cases"])
    assert len(rows) == len(mod.MEMORY_PAIRS)
    for r in rows:
        assert r["published_nvml"] > r["published_allocated"] > 0
        assert 0 < r["allocated"] < r["reserved"] < r["device_total"]
