"""The model catalog as data: names, sources, shapes (pure rules, no torch), seed counts,
published parameter totals, and the ``loraplan models`` / ``loraplan gpus`` commands."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from click.testing import CliRunner

from loraplan.catalog import HERE, load_model, model_entries, model_names
from loraplan.commands.catalog_cmds import gpus_command, models_command
from loraplan.estimate.params import count_params
from loraplan.hf import RULES
from loraplan.spec import LoraSpec

NAMES = model_names()
ROLES = {"q", "k", "v", "o", "qkv", "gate", "up", "gate_up", "down", "fc_in", "fc_out", "lm_head",
         "project_in", "project_out", "cross_q", "cross_k", "cross_v", "cross_o", "shared_expert_gate"}

#: total parameters as published (model cards / safetensors metadata) = what the rules derive
PUBLISHED_TOTALS = {
    "llama-2-7b": 6_738_415_616,
    "llama-2-13b": 13_015_864_320,
    "llama-2-70b": 68_976_648_192,
    "llama-3-8b": 8_030_261_248,
    "llama-3-70b": 70_553_706_496,
    "llama-3.1-8b": 8_030_261_248,
    "llama-3.1-70b": 70_553_706_496,
    "llama-3.1-405b": 405_853_388_800,
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.2-3b": 3_212_749_824,
    "mistral-7b": 7_241_732_096,
    "mistral-7b-v0.3": 7_248_023_552,
    "open-llama-3b-v2": 3_426_473_600,
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-1.5b": 1_543_714_304,
    "qwen2.5-3b": 3_085_938_688,
    "qwen2.5-7b": 7_615_616_512,
    "qwen2.5-14b": 14_770_033_664,
    "qwen2.5-32b": 32_763_876_352,
    "qwen2.5-72b": 72_706_203_648,
    "gemma-2-2b": 2_614_341_888,
    "gemma-2-9b": 9_241_705_984,
    "gemma-2-27b": 27_227_128_320,
    "phi-3-mini-4k": 3_821_079_552,
    "phi-3-medium-4k": 13_960_238_080,
    "falcon-7b": 6_921_720_704,
    "pythia-1b": 1_011_781_632,
    "pythia-6.9b": 6_857_302_016,
    "flan-t5-xxl": 11_135_332_352,
    "mt0-large": 1_229_581_312,
}

#: Qwen3 model cards give rounded totals and non-embedding counts (billions)
QWEN3_CARDS = {"qwen3-0.6b": (0.6, 0.44), "qwen3-1.7b": (1.7, 1.4), "qwen3-4b": (4.0, 3.6),
               "qwen3-8b": (8.2, 6.95), "qwen3-14b": (14.8, 13.2), "qwen3-32b": (32.8, 31.2)}


#: MoE checkpoints whose totals are published rounded (billions): OLMoE paper (arXiv 2409.02060)
#: "7 billion (B) parameters", 6.9B in its tables; the Qwen1.5-MoE-A2.7B model card 14.3B. OLMoE's
#: experts are 1024 wide in the published config.json, not OlmoeConfig's default 2048 (13.4B)
MOE_CARDS = {"olmoe-1b-7b-0924": 6.9, "qwen1.5-moe-a2.7b": 14.3}


@pytest.mark.parametrize("name,billions", sorted(MOE_CARDS.items()))
def test_moe_published_rounded_totals(name, billions):
    assert round(load_model(name).total_params / 1e9, 1) == billions


def test_catalog_has_at_least_30_models():
    assert len(NAMES) >= 30


@pytest.mark.parametrize("name", NAMES)
def test_entry_is_well_formed(name):
    e = model_entries()[name]
    assert re.fullmatch(r"[a-z0-9][a-z0-9.]*(-[a-z0-9.]+)*", name), name
    assert (HERE / "models" / f"{name}.json").exists()  # file name = catalog name
    if e.get("test_shape"):  # tiny-llama: a shape for CPU smoke runs, with no checkpoint anywhere, and says so
        assert "test shape" in e["source"] and "test shape" in e["notes"] and load_model(name).total_params < 10**6
    else:
        # the config.json page the values were read from: main, or the pinned revision/branch that was read
        assert re.fullmatch(r"https://huggingface\.co/[\w.-]+/[\w.-]+/(blob|blame|raw)/[\w.%-]+/config\.json",
                            e["source"])
    assert e["config"]["model_type"] in RULES  # every catalog model has a pure rule (no torch needed)


@pytest.mark.parametrize("name", NAMES)
def test_spec_is_consistent(name):
    s = load_model(name)
    assert s.name == name and s.source == model_entries()[name]["source"]
    names = [l.name for l in s.linears]
    assert len(names) == len(set(names))
    assert {l.role for l in s.linears} <= ROLES
    assert [l.name for l in s.linears if l.role == "lm_head"] == ["lm_head"]
    assert all(l.in_features > 0 and l.out_features > 0 for l in s.linears)
    layers = {l.layer for l in s.linears if l.stack == "decoder" and l.layer is not None}
    assert layers == set(range(s.num_layers))
    if s.is_encoder_decoder:
        assert {l.layer for l in s.linears if l.stack == "encoder"} == set(range(s.num_encoder_layers))
    assert s.num_heads % s.num_kv_heads == 0
    assert s.total_params == sum(l.numel for l in s.linears if not (l.role == "lm_head" and s.tie_word_embeddings)) \
        + sum(p.numel for p in s.others) + sum(e.numel for e in s.experts)


@pytest.mark.parametrize("name,total", sorted(PUBLISHED_TOTALS.items()))
def test_published_totals(name, total):
    assert load_model(name).total_params == total


@pytest.mark.parametrize("name", sorted(QWEN3_CARDS))
def test_qwen3_model_card_counts(name):
    s = load_model(name)
    total_b, non_emb_b = QWEN3_CARDS[name]
    emb = sum(p.numel for p in s.others if p.kind == "embedding")
    head = 0 if s.tie_word_embeddings else s.lm_head.numel
    assert round(s.total_params / 1e9, 1) == total_b
    decimals = len(str(non_emb_b).split(".")[1])
    assert round((s.total_params - emb - head) / 1e9, decimals) == non_emb_b


@pytest.mark.parametrize("name,rank,targets,expected", [
    ("open-llama-3b-v2", 8, ("q_proj", "v_proj"), 2_662_400),
    ("open-llama-3b-v2", 16, ("q_proj", "v_proj"), 5_324_800),
    ("open-llama-3b-v2", 8, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                             "lm_head"), 12_994_560),
    ("llama-2-7b", 8, ("q_proj", "v_proj"), 4_194_304),
    ("flan-t5-xxl", 16, ("q", "v"), 18_874_368),
])
def test_seed_trainable_counts(name, rank, targets, expected):
    assert count_params(load_model(name), LoraSpec(rank=rank, targets=targets)).trainable == expected


def test_tie_and_vocab_facts():
    m = {n: load_model(n) for n in NAMES}
    assert all(m[n].vocab_size == 128256 for n in NAMES if n.startswith("llama-3"))
    assert all(m[n].config["rope_theta"] == 500000.0 for n in NAMES if n.startswith("llama-3"))
    assert m["qwen2.5-7b"].vocab_size == 152064 and not m["qwen2.5-7b"].tie_word_embeddings
    for n in ("qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b", "qwen3-0.6b", "qwen3-1.7b", "qwen3-4b",
              "llama-3.2-1b", "llama-3.2-3b", "gemma-2-2b", "gemma-2-9b", "gemma-2-27b", "t5-base", "opt-6.7b",
              "falcon-7b"):
        assert m[n].tie_word_embeddings, n
    for n in ("qwen2.5-7b", "qwen3-8b", "llama-3-8b", "flan-t5-xxl", "mt0-large", "pythia-1b", "phi-3-mini-4k"):
        assert not m[n].tie_word_embeddings, n
    assert m["flan-t5-xxl"].is_encoder_decoder and m["flan-t5-xxl"].num_encoder_layers == 24
    assert m["gemma-2-9b"].arch.attention == "eager" and m["gemma-2-9b"].arch.final_logit_softcapping == 30.0
    assert m["mistral-7b"].arch.sliding_window == 4096 and m["mistral-7b-v0.3"].arch.sliding_window is None
    assert m["falcon-7b"].num_kv_heads == 1 and m["falcon-7b"].arch.parallel_attn
    assert m["pythia-6.9b"].arch.parallel_attn and m["pythia-6.9b"].arch.norm == "layer"
    assert m["opt-6.7b"].arch.position == "learned" and m["t5-base"].arch.mlp == "plain"
    assert m["flan-t5-base"].arch.mlp == "gated"


def test_catalog_loads_without_torch():
    code = ("import sys; from loraplan.catalog import load_model, model_names; "
            "[load_model(n) for n in model_names()]; "
            "import loraplan.commands.catalog_cmds as c; c.model_rows(); c.gpu_rows(); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_models_command_table_and_json():
    r = CliRunner().invoke(models_command, [])
    assert r.exit_code == 0, r.output
    assert "llama-2-7b" in r.output and "6.74B" in r.output
    r = CliRunner().invoke(models_command, ["--format", "json"])
    rows = json.loads(r.output)
    assert [x["name"] for x in rows] == NAMES
    row = next(x for x in rows if x["name"] == "flan-t5-xxl")
    assert (row["total_params"], row["layers"], row["encoder_layers"], row["tie_word_embeddings"]) == \
        (11_135_332_352, 24, 24, False)
    assert row["source"].startswith("https://huggingface.co/google/flan-t5-xxl")


def test_gpus_command_table_and_json():
    from loraplan.catalog import gpu_entries

    r = CliRunner().invoke(gpus_command, ["--format", "json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)
    assert len(rows) == len(gpu_entries())
    r = CliRunner().invoke(gpus_command, [])
    assert r.exit_code == 0, r.output
    for row in rows:
        assert row["id"] in r.output


def test_gpus_command_with_empty_catalog(monkeypatch):
    import loraplan.catalog as cat

    monkeypatch.setattr(cat, "gpu_entries", lambda: {})
    r = CliRunner().invoke(gpus_command, [])
    assert r.exit_code == 0 and "empty" in r.output
    r = CliRunner().invoke(gpus_command, ["--format", "json"])
    assert json.loads(r.output) == []


def test_models_filters_by_family_and_size():
    """``loraplan models --family/--min-params/--max-params/--size`` keep the rows that match."""
    from loraplan.commands.catalog_cmds import filter_rows, model_rows, parse_size

    assert parse_size("7B") == 7e9 and parse_size("500m") == 5e8 and parse_size("1.5e9") == 1.5e9
    rows = model_rows()
    gemma = filter_rows(rows, ("gemma3_text",))
    assert gemma and {r["model_type"] for r in gemma} == {"gemma3_text"}
    small = filter_rows(rows, (), None, 1e9)
    assert small and all(r["total_params"] <= 1e9 for r in small)
    mid = filter_rows(rows, ("llama", "olmo2"), 5e9, 9e9)
    assert {r["name"] for r in mid} >= {"llama-3.1-8b", "olmo-2-1124-7b"}


def test_models_unknown_family_is_bad_input_with_a_suggestion(run_cli):
    """A misspelt --family exits 2 naming the value and the closest family, not 'no model matches'."""
    code, out, err = run_cli("models", "--family", "lama")
    assert code == 2 and "'lama'" in err and "did you mean llama" in err and "Traceback" not in err + out


def test_catalog_has_70_models_with_sources():
    from loraplan.catalog import model_entries

    entries = model_entries()
    assert len(entries) >= 70
    assert all(e.get("source", "").startswith("https://") for e in entries.values() if not e.get("test_shape"))


def test_hugging_face_ids_resolve_like_the_recipe_files(tmp_path, monkeypatch, run_cli):
    """--model takes the Hugging Face id of a catalog model (its config.json source), as a TRL YAML's
    model_name_or_path does (recipes.resolve_model_name, the same catalog.hub_model); an unknown
    org/name is one line naming the close catalog ids; a local folder of that name wins."""
    from loraplan.catalog import hub_model
    from loraplan.errors import UnknownNameError
    from loraplan.recipes import resolve_model_name

    assert hub_model("meta-llama/Meta-Llama-3-8B") == "llama-3-8b" == resolve_model_name("meta-llama/Meta-Llama-3-8B")
    assert load_model("meta-llama/Meta-Llama-3-8B").name == load_model("llama-3-8b").name
    with pytest.raises(UnknownNameError, match=r"did you mean llama-3-8b \(meta-llama/meta-llama-3-8b\)"):
        load_model("meta-llama/Meta-Llama-3-8B-Instructx")
    code, out, err = run_cli("estimate", "--model", "nobody/nothing-7b")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "huggingface.co/nobody" in err
    code, out, err = run_cli("estimate", "--model", "meta-llama/Meta-Llama-3-8B")
    assert code == 0 and out.startswith("llama-3-8b (llama)"), err
    local = tmp_path / "meta-llama" / "Meta-Llama-3-8B"
    local.mkdir(parents=True)
    (local / "config.json").write_text(json.dumps(model_entries()["llama-3-8b"]["config"]
                                                  | {"num_hidden_layers": 2}))
    monkeypatch.chdir(tmp_path)
    load_model.cache_clear()
    assert load_model("meta-llama/Meta-Llama-3-8B").num_layers == 2
    assert resolve_model_name("meta-llama/Meta-Llama-3-8B") == "meta-llama/Meta-Llama-3-8B"
    load_model.cache_clear()
