"""The meta trace's autocast emulation (loraplan.trace.autocast) against real torch.autocast.

CUDA autocast cannot run here (no GPU) and does not run on meta; CPU autocast is the same
mechanism (a dispatch key above autograd, the same cached_cast) with the CPU op lists. So a tiny
llama LoRA step on CPU tensors under real ``torch.autocast('cpu', dtype=torch.bfloat16)`` and the
same step under ``EmulatedAutocast(torch.bfloat16, device='cpu')`` (real autocast off) must save
the same bytes and reach the same peak, counted by the live-tensor tracker.
"""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")


def _step(mode: str, gc: bool, adapter_dtype, load_dtype):
    import transformers
    from peft import LoraConfig, get_peft_model

    from loraplan.trace.autocast import EmulatedAutocast
    from loraplan.trace.tracker import LiveTensorTracker

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)
    cfg.use_cache = False
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=load_dtype, attn_implementation="sdpa")
    emu = EmulatedAutocast(torch.bfloat16, device="cpu") if mode == "emulated" else None
    if gc:
        kw = {"use_reentrant": False}
        if emu is not None:
            kw["context_fn"] = emu.checkpoint_context_fn()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj",
                                                                                                   "down_proj"]))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(adapter_dtype)
    model.train()
    ids = torch.randint(0, 256, (2, 32))
    tr = LiveTensorTracker(round_to=512)
    tr.register(list(model.parameters()), label="weights")
    after_forward = []
    with tr:
        for _ in range(2):
            import contextlib

            ctx = {"real": lambda: torch.autocast("cpu", dtype=torch.bfloat16), "emulated": lambda: emu,
                   "off": contextlib.nullcontext}[mode]()
            with ctx:
                loss = model(input_ids=ids, labels=ids).loss
            after_forward.append(tr.current)
            loss.backward()
            for p in model.parameters():
                p.grad = None
    return tr.peak, after_forward, (emu.casts if emu else None)


@pytest.mark.parametrize("gc", [False, True])
@pytest.mark.parametrize("adapter_dtype,load_dtype", [("float32", "float32"), ("float32", "bfloat16"),
                                                      ("bfloat16", "float32")])
def test_emulated_autocast_matches_real_cpu_autocast(gc, adapter_dtype, load_dtype):
    a, l = getattr(torch, adapter_dtype), getattr(torch, load_dtype)
    real, real_saved, _ = _step("real", gc, a, l)
    emulated, emulated_saved, casts = _step("emulated", gc, a, l)
    off, off_saved, _ = _step("off", gc, a, l)
    assert casts, "the emulation made no cast"
    assert (emulated, emulated_saved) == (real, real_saved)
    assert (off, off_saved) != (real, real_saved)  # autocast changes the step's memory: the comparison can fail
