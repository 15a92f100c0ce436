"""loraplan.case and the self-validating specs: one set of defaults and rules for the API and the CLI."""

import ast
import json
from dataclasses import replace
from pathlib import Path

import pytest

import loraplan
from loraplan.case import DEFAULTS, resolve_case
from loraplan.catalog import load_gpu, load_model
from loraplan.errors import InputError, LoraplanError
from loraplan.spec import LoraSpec, TrainSpec
from loraplan.targets import default_targets

PACKAGE = Path(loraplan.__file__).parent


# ---- specs reject bad values through the Python API, with the CLI's one-line messages ----

@pytest.mark.parametrize("make,needles", [
    (lambda: LoraSpec(rank=0), ("--rank 0", "positive integer", "typical: 8, 16, 64")),
    (lambda: LoraSpec(rank=-4), ("--rank -4", "positive integer")),
    (lambda: LoraSpec(rank=8.0), ("--rank 8.0", "positive integer")),
    (lambda: LoraSpec(rank=True), ("--rank True", "positive integer")),
    (lambda: LoraSpec(rank=float("inf")), ("--rank inf", "positive integer")),
    (lambda: LoraSpec(rank="8"), ("--rank '8'", "positive integer")),
    (lambda: LoraSpec(dropout=1.5), ("--dropout 1.5", "[0, 1)")),
    (lambda: LoraSpec(dropout=1.0), ("--dropout 1.0", "[0, 1)")),
    (lambda: LoraSpec(dropout=float("nan")), ("--dropout nan", "[0, 1)")),
    (lambda: LoraSpec(alpha=float("nan")), ("--alpha nan", "finite number")),
    (lambda: LoraSpec(alpha=float("inf")), ("--alpha inf", "finite number")),
    (lambda: LoraSpec(alpha=True), ("--alpha True", "finite number")),
    (lambda: LoraSpec(targets=()), ("--targets", "q_proj")),
    (lambda: LoraSpec(targets=("q_proj", 3)), ("--targets", "q_proj")),
    (lambda: TrainSpec(quant="int4"), ("--quant 'int4'", "is not one of", "did you mean", "int8")),
    (lambda: TrainSpec(optimizer="adam"), ("--optimizer 'adam'", "did you mean", "adamw")),
    (lambda: TrainSpec(attention="flash2"), ("--attention 'flash2'", "flash")),
    (lambda: TrainSpec(device="gpu"), ("--device 'gpu'", "cuda, cpu")),
    (lambda: TrainSpec(batch=0), ("--batch 0", "positive integer")),
    (lambda: TrainSpec(batch=2.5), ("--batch 2.5", "positive integer")),
    (lambda: TrainSpec(batch=False), ("--batch False", "positive integer")),
    (lambda: TrainSpec(seq=-5), ("--seq -5", "positive integer")),
    (lambda: TrainSpec(seq=float("nan")), ("--seq nan", "positive integer")),
    (lambda: TrainSpec(target_seq=0), ("--target-seq 0", "positive integer")),
    (lambda: TrainSpec(int8_outlier_fraction=1.5), ("--int8-outlier-fraction 1.5", "between 0 and 1")),
    (lambda: TrainSpec(int8_outlier_fraction=-0.1), ("--int8-outlier-fraction -0.1", "between 0 and 1")),
    (lambda: TrainSpec(int8_outlier_fraction=float("nan")), ("--int8-outlier-fraction nan", "between 0 and 1")),
    (lambda: TrainSpec(double_quant="yes"), ("--double-quant 'yes'", "True or False")),
    (lambda: TrainSpec(gradient_checkpointing=1), ("--gradient-checkpointing 1", "True or False")),
])
def test_specs_reject_bad_values(make, needles):
    with pytest.raises(InputError) as ei:
        make()
    msg = str(ei.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg


def test_specs_accept_good_values_and_normalise_targets():
    assert LoraSpec(rank=4, alpha=0.5, dropout=0.0, targets=["q_proj", "v_proj"]).targets == ("q_proj", "v_proj")
    assert LoraSpec(targets="q_proj, v_proj,q_proj").targets == ("q_proj", "v_proj")  # split like --targets
    assert LoraSpec(rank=32).alpha == 64.0 and LoraSpec(rank=32, alpha=16).alpha == 16
    t = TrainSpec(quant="int8", optimizer="paged_adamw_8bit", batch=4, seq=2048, target_seq=128,
                  int8_outlier_fraction=0.0, attention="math", device="cpu", double_quant=False)
    assert t.batch == 4 and t.int8_outlier_fraction == 0.0


def test_numpy_scalars_are_checked_and_arrays_pass():
    np = pytest.importorskip("numpy")
    assert LoraSpec(rank=np.int64(8)).rank == 8
    with pytest.raises(InputError, match="--rank 0"):
        LoraSpec(rank=np.int64(0))
    with pytest.raises(InputError, match="--dropout"):
        LoraSpec(dropout=np.float64(2.0))
    # the vectorized sweep / time model: arrays of values checked one by one before
    r, d = np.array([8, 16]), np.array([0.0, 0.1])
    lora = replace(LoraSpec(), rank=r, dropout=d, alpha=2.0 * r)
    train = replace(TrainSpec(), batch=np.array([1, 2]), seq=np.array([256, 512]), int8_outlier_fraction=d)
    assert lora.rank is r and train.int8_outlier_fraction is d


# ---- one set of defaults ----

def test_api_defaults_are_the_cli_defaults():
    lora, train = LoraSpec(), TrainSpec()
    assert (lora.rank, lora.alpha, lora.dropout, lora.targets) == (8, 16.0, 0.05, None)
    for k in ("rank", "dropout", "targets"):
        assert DEFAULTS[k] == getattr(lora, k)
    assert DEFAULTS["alpha"] is None  # 2 x rank
    for k in ("quant", "double_quant", "optimizer", "batch", "seq", "target_seq", "gradient_checkpointing",
              "attention", "int8_outlier_fraction"):
        assert DEFAULTS[k] == getattr(train, k), k
    model, l2, t2 = resolve_case({})
    assert model.name == DEFAULTS["model"]
    assert l2 == replace(lora, targets=default_targets(model)) == replace(lora, targets=("q_proj", "v_proj"))
    assert t2 == train


def test_api_estimate_with_defaults_equals_the_cli(run_cli):
    from loraplan.estimate.api import estimate

    model, gpu = load_model(DEFAULTS["model"]), load_gpu(DEFAULTS["gpu"])
    api = estimate(model, LoraSpec(), TrainSpec(), gpu).to_dict()
    assert api["inputs"]["targets"] == ["q_proj", "v_proj"] and api["inputs"]["alpha"] == 16.0
    code, out, _ = run_cli("estimate", "--format", "json")
    assert code == 0
    assert json.loads(out) == json.loads(json.dumps(api))


def test_resolve_case_keeps_its_check_order_and_messages():
    # several bad values: the first in the old order (rank, batch, seq, target_seq, dropout, fraction)
    with pytest.raises(InputError, match="^--batch 0 must be a positive integer$"):
        resolve_case({"model": "qwen2.5-0.5b", "dropout": "1.5", "batch": "0"})
    with pytest.raises(InputError, match="--target-seq 0"):  # checked even for a decoder-only model
        resolve_case({"model": "qwen2.5-0.5b", "target_seq": 0})
    with pytest.raises(InputError, match="--int8-outlier-fraction 2.0"):  # checked even when quant is not int8
        resolve_case({"model": "qwen2.5-0.5b", "int8_outlier_fraction": "2"})
    with pytest.raises(InputError, match="--alpha nan must be a finite number"):
        resolve_case({"model": "qwen2.5-0.5b", "alpha": "nan"})


@pytest.mark.parametrize("args,needle", [(["--alpha", "nan"], "--alpha nan"), (["--dropout", "nan"], "--dropout nan"),
                                         (["--quant", "int4"], "did you mean")])
def test_cli_bad_values_are_one_line(run_cli, args, needle):
    code, _, err = run_cli("estimate", *args)
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err and "Traceback" not in err


# ---- grid files: the command line wins, in sweep and profile alike ----

def _grid(tmp_path):
    g = tmp_path / "g.json"
    g.write_text(json.dumps([{"model": "qwen2.5-0.5b", "seq": [256, 1024], "rank": 4},
                             {"model": "qwen2.5-0.5b", "quant": "bf16", "seq": 128}]))
    return g


EXPECTED = {(512, 8)}  # every grid's seq replaced by --seq 512, its rank by --rank 8


def test_sweep_grid_command_line_wins(run_cli, tmp_path):
    out = tmp_path / "s.jsonl"
    code, _, err = run_cli("sweep", "--grid", str(_grid(tmp_path)), "--seq", "512", "--rank", "8",
                           "--gpu", "l4-24gb", "--out", str(out), "--quiet")
    assert code == 0, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2  # one case per grid: the grid's seq lists are replaced, not added to
    assert {(r["seq"], r["rank"]) for r in rows} == EXPECTED
    assert sorted(r["quant"] for r in rows) == ["bf16", "nf4"]  # keys only the grid sets stay


def test_profile_grid_command_line_wins(run_cli, tmp_path, monkeypatch):
    import loraplan.profile.runner as runner

    seen = []

    class Stop(LoraplanError):
        pass

    def check_extras(cases, device):
        seen.extend(cases)
        raise Stop("stop before running")

    monkeypatch.setattr(runner, "check_extras", check_extras)
    code, _, err = run_cli("profile", "--grid", str(_grid(tmp_path)), "--seq", "512", "--rank", "8",
                           "--device", "cpu", "--out", str(tmp_path / "p.jsonl"))
    assert code == 2 and "stop before running" in err
    assert len(seen) == 2
    assert {(c.train.seq, c.lora.rank) for c in seen} == EXPECTED
    assert sorted(c.train.quant for c in seen) == ["bf16", "nf4"]


def test_merge_grid_is_the_one_rule():
    from loraplan.case import merge_grid
    from loraplan.profile.grid import CASE_KEYS, merge_grids
    from loraplan.sweep import expand_cases

    g = {"seq": [256, 1024], "quant": "bf16", "model": "qwen2.5-0.5b"}
    cli = {"seq": "512", "rank": None, "targets": ()}
    assert merge_grid(cli, g, CASE_KEYS) == merge_grids(cli, [g])[0]
    assert merge_grid(cli, g, CASE_KEYS)["seq"] == "512" and merge_grid(cli, g, CASE_KEYS)["targets"] is None
    cases = expand_cases({**cli, "gpu": "l4-24gb"}, [g]).to_dicts()
    assert [(c["seq"], c["quant"]) for c in cases] == [(512, "bf16")]


# ---- the library never imports the CLI ----

def _imports(path: Path) -> set[str]:
    """Absolute module names imported by one file (relative imports resolved)."""
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    pkg = parts[:-1]  # the package a relative import starts from (for __init__.py: the package itself)
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = pkg[: len(pkg) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def test_resolving_relative_imports():
    mods = _imports(PACKAGE / "commands" / "profile.py")
    assert "loraplan.case.expand_grid" in mods and "loraplan.commands.options" in mods
    assert "loraplan.errors.DeviceError" in _imports(PACKAGE / "profile" / "runner.py")
    assert "loraplan.errors" in _imports(PACKAGE / "case.py")


def test_library_never_imports_the_cli():
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith("commands/") or rel == "cli.py":
            continue
        hits = sorted(m for m in _imports(path) if m == "loraplan.commands" or m.startswith("loraplan.commands.")
                      or m == "loraplan.cli" or m == "click" or m.startswith("click."))
        if hits:
            bad.append(f"{rel}: {', '.join(hits)}")
    assert not bad, bad


def test_target_seq_on_a_decoder_only_model_is_named_not_dropped():
    """--target-seq only exists for encoder-decoder models: a decoder-only case warns that it is ignored."""
    import warnings

    from loraplan.case import resolve_case

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, _, train = resolve_case({"model": "llama-2-7b", "target_seq": 128})
    assert train.target_seq is None
    assert any("--target-seq 128" in str(w.message) and "decoder-only" in str(w.message) for w in caught)
