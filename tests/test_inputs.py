"""The input-safety layer: files that cannot hang, JSON that cannot recurse, config values checked."""

from __future__ import annotations

import json
import math
import os
import time

import pytest

from loraplan.catalog import model_entries
from loraplan.errors import ConfigError, InputError
from loraplan.inputs import (MAX_JSON_DEPTH, check_model_config, finite, json_depth, parse_json, positive_int,
                             read_json_file, read_text_file)

HINT = "give a catalog name"


def test_regular_utf8_file_and_bom(tmp_path):
    p = tmp_path / "config.json"
    p.write_text('{"model_type": "llama"}')
    assert read_json_file(p, "model config", HINT) == {"model_type": "llama"}
    p.write_bytes(b"\xef\xbb\xbf" + b'{"model_type": "llama"}')
    assert read_json_file(p, "model config", HINT) == {"model_type": "llama"}


@pytest.mark.parametrize("content, words", [
    ('{"a": 1}'.encode("utf-16"), "UTF-16"),
    (b"\xff\xfe\x00\x00{", "UTF-16/32"),
    (b'{"a": "\xe9"}', "not UTF-8"),
])
def test_other_encodings_are_refused(tmp_path, content, words):
    p = tmp_path / "c.json"
    p.write_bytes(content)
    with pytest.raises(ConfigError, match=words):
        read_text_file(p, "model config", HINT)


def test_fifo_and_devices_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "config.json"
    os.mkfifo(fifo)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="not a regular file"):
        read_text_file(fifo, "model config", HINT)
    with pytest.raises(ConfigError, match="not a regular file"):
        read_text_file("/dev/zero", "model config", HINT)
    assert time.perf_counter() - t0 < 1.0


def test_folder_missing_and_too_large(tmp_path):
    with pytest.raises(ConfigError, match="is a folder"):
        read_text_file(tmp_path, "model config", HINT)
    with pytest.raises(ConfigError, match="No such file"):
        read_text_file(tmp_path / "nope.json", "model config", HINT)
    big = tmp_path / "big.json"
    big.write_bytes(b" " * 2048)
    with pytest.raises(ConfigError, match="more than the 1,024"):
        read_text_file(big, "model config", HINT, max_bytes=1024)


def test_depth_is_capped_before_parsing():
    assert json_depth('{"a": [1, {"b": "[[[["}]}') == 3
    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(ConfigError, match=f"100000 levels deep \\(at most {MAX_JSON_DEPTH}\\)"):
        parse_json(deep, "model config", "x.json", HINT)
    with pytest.raises(ConfigError, match="line 1, column 10"):
        parse_json('{"a": 1} x', "model config", "x.json", HINT)


def test_every_catalog_config_passes():
    for name, entry in model_entries().items():
        check_model_config(entry["config"], name)


BASE = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "intermediate_size": 11008, "vocab_size": 32000}


@pytest.mark.parametrize("key, value, words", [
    ("hidden_size", True, "hidden_size = true must be a positive integer"),
    ("hidden_size", "4096", 'hidden_size = "4096" must be a positive integer'),
    ("hidden_size", 0, "hidden_size = 0"),
    ("intermediate_size", -1, "intermediate_size = -1"),
    ("vocab_size", float("inf"), "vocab_size = inf"),
    ("vocab_size", float("nan"), "vocab_size = nan"),
    ("num_hidden_layers", 64.0, "num_hidden_layers = 64.0"),
    ("num_hidden_layers", 10**12, "up to 10,000"),
    ("num_hidden_layers", [32], "num_hidden_layers = \\[32\\]"),
    ("num_key_value_heads", 5, "num_key_value_heads = 5 does not divide the 32 attention heads"),
    ("num_key_value_heads", -8, "num_key_value_heads = -8"),
    ("head_dim", 0, "head_dim = 0 must be a positive integer up to 10,000,000 or null"),
    ("rms_norm_eps", float("nan"), "rms_norm_eps = nan must be a finite number"),
    ("attention_dropout", 1.0, "attention_dropout = 1.0 must be a probability"),
    ("tie_word_embeddings", "no", 'tie_word_embeddings = "no" must be true or false'),
    ("model_type", 3, "model_type 3 is not a model type name"),
])
def test_impossible_values_are_named(key, value, words):
    with pytest.raises(ConfigError, match=words):
        check_model_config({**BASE, key: value}, "config.json")


def test_nulls_where_the_class_default_applies():
    check_model_config({**BASE, "num_key_value_heads": None, "head_dim": None, "sliding_window": None,
                        "max_position_embeddings": None}, "config.json")


def test_huge_weights_are_refused_before_any_loop():
    with pytest.raises(ConfigError, match="1e\\+15 bytes of weights"):
        check_model_config({**BASE, "hidden_size": 9_000_000, "intermediate_size": 9_000_000}, "config.json")


def test_not_an_object_or_no_model_type():
    with pytest.raises(ConfigError, match="holds a JSON list"):
        check_model_config([1, 2], "config.json")
    with pytest.raises(ConfigError, match="no 'model_type'"):
        check_model_config({"hidden_size": 8}, "config.json")


def test_json_infinity_reaches_the_checks_as_a_float():
    cfg = json.loads('{"model_type": "llama", "vocab_size": 1e999999}')
    assert math.isinf(cfg["vocab_size"])
    with pytest.raises(ConfigError, match="vocab_size = inf"):
        check_model_config(cfg, "config.json")


@pytest.mark.parametrize("v", [float("nan"), float("inf"), -float("inf"), "1", True, None])
def test_finite_refuses_non_numbers(v):
    with pytest.raises(InputError, match="is not a finite number; use"):
        finite(v, "--tokens", "use a positive number of tokens")


@pytest.mark.parametrize("v", [0, -1, 2.0, True, "3", 11])
def test_positive_int(v):
    with pytest.raises(InputError, match="is not a positive integer"):
        positive_int(v, "--batch", "use 1 or more", upper=10)
    assert positive_int(3, "--batch", "x") == 3


def test_every_shipped_calibration_is_in_range():
    from loraplan.catalog import calibration_entries
    from loraplan.inputs import check_coefficients

    for gpu, entry in calibration_entries().items():
        check_coefficients(entry["coefficients"], gpu)


@pytest.mark.parametrize("name, value, words", [
    ("reserved_over_allocated_ratio", -0.5, "reserved_over_allocated_ratio = -0.5 is not a possible"),
    ("time_eff_mm", 0.0, "allowed 0.0001 to 1"),
    ("time_eff_bw", float("nan"), "time_eff_bw = nan"),
    ("cuda_context_bytes", "x", 'cuda_context_bytes = "x"'),
    ("cublas_handles", True, "cublas_handles = true"),
    ("time_host_op_s", -9.0, "time_host_op_s = -9.0"),
    ("time_eff_nm", 0.5, "unknown coefficient 'time_eff_nm'; did you mean time_eff_mm"),
])
def test_impossible_coefficients_are_named(name, value, words):
    from loraplan.inputs import check_coefficients

    with pytest.raises(ConfigError, match=words):
        check_coefficients({name: value}, "cal.json")
