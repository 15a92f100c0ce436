"""The training stack in real (tiny) CPU bursts: ``profile --trainer hf|trl`` runs the real
transformers.Trainer / trl.SFTTrainer, and every recipe field reaches the step it describes."""


import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from loraplan.profile.burst import MEMORY_PHASES, run_burst  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def spec(cache, tiny_configs):
    """spec(quant=..., steps=..., **recipe) -> the worker spec of a tiny llama CPU burst."""
    def make(quant="bf16", gc=True, steps=2, batch=2, seq=16, targets=("q_proj", "v_proj"), **recipe):
        train = {"quant": quant, "double_quant": True, "optimizer": "adamw", "batch": batch, "seq": seq,
                 "target_seq": None, "gradient_checkpointing": gc, "attention": "auto",
                 "int8_outlier_fraction": None, **recipe}
        return {"model": {"name": "tiny-llama", "config": tiny_configs["llama"]},
                "lora": {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": list(targets)},
                "train": train, "device": "cpu", "steps": steps, "warmup": 1, "cache_dir": str(cache)}

    return make


def ok(r):
    assert r["status"] == "ok", r.get("traceback") or r.get("error")
    return r


@pytest.fixture
def linear_outputs():
    """dtypes of every nn.Linear output (the frozen base layers and the LoRA A/B) while a burst runs."""
    seen = []

    def hook(module, args, output):
        if isinstance(module, torch.nn.Linear) and isinstance(output, torch.Tensor):
            seen.append(output.dtype)

    h = torch.nn.modules.module.register_module_forward_hook(hook)
    yield seen
    h.remove()


@pytest.fixture
def optimizer_steps():
    """How many times any torch optimizer stepped while a burst runs."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    n = [0]
    h = register_optimizer_step_post_hook(lambda opt, args, kwargs: n.__setitem__(0, n[0] + 1))
    yield n
    h.remove()


@pytest.mark.parametrize("trainer", ["hf", "trl"])
def test_profile_cli_trainer_records(run_cli, tmp_path, tiny_llama_config, trainer):
    from loraplan.profile.records import read_records

    out = tmp_path / "cpu.jsonl"
    args = ["profile", "--device", "cpu", "--model", str(tiny_llama_config), "--quant", "bf16", "--trainer", trainer,
            "--batch", "2", "--seq", "16", "--rank", "4", "--steps", "2", "--warmup", "1", "--out", str(out),
            "--cache-dir", str(tmp_path / "cache")]
    code, _, err = run_cli(*args)
    assert code == 0, err
    (r,) = read_records(out).records
    assert r["status"] == "ok", r.get("error")
    assert r["inputs"]["trainer"] == trainer and r["inputs"]["mixed_precision"] == ("bf16" if trainer == "trl" else "no")
    assert r["inputs"]["max_grad_norm"] == 1.0  # the trainer's default, resolved into the inputs (and the key)
    assert r["protocol"]["trainer"] == {"hf": "Trainer", "trl": "SFTTrainer"}[trainer]
    assert r["protocol"]["recipe"]["trainer"] == trainer
    assert set(MEMORY_PHASES) <= set(r["memory"]["phases"]) and len(r["memory"]["step_peaks"]) == 2
    assert r["memory"]["peak_allocated_bytes"] > r["memory"]["phases"]["load"]["max_allocated_bytes"] > 0
    assert r["estimate"]["inputs"]["trainer"] == trainer
    # the CPU tracker sees what the Trainer allocates: AdamW's two fp32 states per trainable element
    # appear in the first optimizer step (Trainer.create_optimizer runs inside trainer.train)
    phases = r["memory"]["phases"]
    grown = phases["first_optimizer_step"]["max_allocated_bytes"] - phases["lora"]["max_allocated_bytes"]
    assert grown >= 2 * 4 * r["params"]["trainable"]
    code, _, err = run_cli(*args)  # resume: the case is recorded, nothing runs again
    assert code == 0 and len(read_records(out).records) == 1


def test_liger_without_liger_kernel_is_one_line(run_cli, tmp_path, tiny_llama_config):
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is not None:
        pytest.skip("liger-kernel is installed")
    code, _, err = run_cli("profile", "--device", "cpu", "--model", str(tiny_llama_config), "--loss", "liger", "--seq", "16",
                           "--out", str(tmp_path / "x.jsonl"), "--cache-dir", str(tmp_path / "cache"))
    assert code == 2 and "liger-kernel" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("trainer", ["loop", "hf", "trl"])
def test_accumulation_steps_the_optimizer_once_per_four_micro_steps(spec, optimizer_steps, trainer):
    r = ok(run_burst(spec(trainer=trainer, gradient_accumulation=4, steps=2)))
    assert optimizer_steps[0] == 2
    assert r["time"]["micro_steps"] == 8 and r["time"]["optimizer_steps"] == 2 and len(r["time"]["step_s"]) == 2


@pytest.mark.parametrize("trainer", ["loop", "hf", "trl"])
@pytest.mark.parametrize("mp", ["no", "bf16"])
def test_mixed_precision_autocasts_the_matmuls(spec, linear_outputs, trainer, mp):
    ok(run_burst(spec(quant="fp32", trainer=trainer, mixed_precision=mp, steps=1)))
    want = torch.bfloat16 if mp == "bf16" else torch.float32
    assert linear_outputs and set(linear_outputs) == {want}


def test_fp16_mixed_precision_scales_the_loss(spec, linear_outputs, monkeypatch):
    scaled = []
    real = torch.amp.GradScaler.scale
    monkeypatch.setattr(torch.amp.GradScaler, "scale", lambda self, out: scaled.append(1) or real(self, out))
    ok(run_burst(spec(quant="fp32", mixed_precision="fp16", max_grad_norm=1.0, steps=1)))
    assert set(linear_outputs) == {torch.float16} and scaled


@pytest.mark.parametrize("trainer", ["loop", "hf", "trl"])
@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpointing_variant(spec, monkeypatch, trainer, reentrant):
    import transformers.modeling_utils as mu

    calls = []
    real = mu.checkpoint

    def spy(fn, *args, **kw):
        calls.append(kw.get("use_reentrant"))
        return real(fn, *args, **kw)

    monkeypatch.setattr(mu, "checkpoint", spy)
    ok(run_burst(spec(trainer=trainer, reentrant=reentrant, steps=1)))
    assert calls and set(calls) == {reentrant}


def test_every_n_layers_checkpoints_fewer_layers(spec, monkeypatch):
    import transformers.modeling_utils as mu

    calls = []
    real = mu.checkpoint
    monkeypatch.setattr(mu, "checkpoint", lambda fn, *a, **kw: calls.append(1) or real(fn, *a, **kw))
    ok(run_burst(spec(steps=1)))
    every = len(calls)
    calls.clear()
    ok(run_burst(spec(steps=1, checkpoint_every_n_layers=2)))
    assert every == 2 and len(calls) == 1  # two decoder layers: both, then layer 0 only


@pytest.mark.parametrize("trainer", ["loop", "hf", "trl"])
@pytest.mark.parametrize("norm", [0.0, 0.5])
def test_clipping(spec, monkeypatch, trainer, norm):
    norms = []
    real = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda params, max_norm, *a, **kw: norms.append(max_norm) or real(params, max_norm, *a, **kw))
    ok(run_burst(spec(trainer=trainer, max_grad_norm=norm, steps=1)))
    assert (0.5 in norms) == (norm > 0)


@pytest.mark.parametrize("trainer", ["loop", "hf", "trl"])
@pytest.mark.parametrize("padding,shape", [("max-length", [2, 16]), ("longest", [2, 12]), ("packing", [2, 16]),
                                           ("padding-free", [1, 24])])
def test_padding_shapes_the_batch(spec, trainer, padding, shape):
    if trainer == "trl" and padding == "packing":
        shape = None  # SFTTrainer packs the documents itself (bfd: one flattened row per batch)
    r = ok(run_burst(spec(trainer=trainer, padding=padding, lengths=[5, 9, 12], steps=1)))
    got = r["protocol"]["input_shape"]
    if shape is None:
        assert got[0] == 1 and got[1] <= 2 * 16
    else:
        assert got == shape


@pytest.mark.parametrize("trainer", ["loop", "hf", "trl"])
@pytest.mark.parametrize("prepare", [True, False])
def test_prepare_kbit_and_dtypes(spec, trainer, prepare):
    pytest.importorskip("bitsandbytes")
    r = ok(run_burst(spec(quant="nf4", trainer=trainer, prepare_kbit=prepare, adapter_dtype="bf16",
                          compute_dtype="bf16", steps=1)))
    dt = r["protocol"]["param_dtypes"]
    assert set(dt["trainable"]) == {"bfloat16"}
    # prepare_model_for_kbit_training casts the unquantized parameters (norms, embeddings) to fp32
    assert ("float32" in dt["frozen"]) == prepare
    assert r["protocol"]["quantization"]["bnb_4bit_compute_dtype"] == "bfloat16"


def test_eager_attention(spec):
    r = ok(run_burst(spec(attn_implementation="eager", steps=1)))
    assert r["protocol"]["attention"] == "eager"


def test_chunked_loss_burst(spec):
    r = ok(run_burst(spec(loss="chunked", steps=1)))
    assert r["protocol"]["recipe"]["loss"] == "chunked" and r["time"]["loss_last"] > 0


def test_trainers_refuse_the_loops_chunked_loss(spec):
    """transformers.Trainer has no chunked loss: refused before anything is loaded (resolve_recipe)."""
    r = run_burst(spec(trainer="hf", loss="chunked", steps=1))
    assert r["status"] == "error" and "--trainer loop" in r["error"] and r["phase"] == "start"


def test_encoder_decoder_runs_seq2seq_trainer(cache, tiny_configs):
    s = {"model": {"name": "tiny-t5", "config": tiny_configs["t5"]},
         "lora": {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["q", "v"]},
         "train": {"quant": "bf16", "double_quant": True, "optimizer": "adamw", "batch": 2, "seq": 16, "target_seq": 8,
                   "gradient_checkpointing": True, "attention": "auto", "int8_outlier_fraction": None, "trainer": "hf"},
         "device": "cpu", "steps": 2, "warmup": 1, "cache_dir": str(cache)}
    r = ok(run_burst(s))
    assert r["protocol"]["trainer"] == "Seq2SeqTrainer" and r["time"]["decoder_tokens_per_step"] == 16
    t = run_burst(dict(s, train=dict(s["train"], trainer="trl")))
    assert t["status"] == "error" and "--trainer hf" in t["error"]


def test_recipes_a_burst_cannot_run_are_refused_before_any_burst(run_cli, tmp_path, tiny_llama_config, write_tiny_config):
    t5 = write_tiny_config(tmp_path, "t5").parent
    common = ["--device", "cpu", "--seq", "16", "--out", str(tmp_path / "x.jsonl"), "--cache-dir", str(tmp_path / "c")]
    for args, says in [(["--model", str(t5), "--trainer", "trl"], "--trainer hf"),
                       (["--model", str(tiny_llama_config), "--trainer", "hf", "--loss", "chunked"], "--trainer loop"),
                       (["--model", str(t5), "--padding", "longest", "--lengths", "8,16"], "--padding max-length"),
                       (["--model", str(tiny_llama_config), "--checkpoint-offload"], "--device cuda"),
                       (["--model", str(tiny_llama_config), "--attn-implementation", "flash_attention_2"], "sdpa")]:
        code, _, err = run_cli("profile", *common, *args)
        assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.jsonl").exists()
