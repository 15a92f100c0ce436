"""Run the real DDP and FSDP2 (wrapped as accelerate + transformers wrap a PEFT model) on tiny-llama under
torch's fake process group (world size 2, one CPU process, no communication) and print the bytes and calls
of every collective of one forward + backward, per configuration (JSON). Used by tests/test_comm_engines.py."""
import json
import warnings

import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

warnings.simplefilter("ignore")
dist.init_process_group("fake", rank=0, world_size=2, store=FakeStore())
from peft import LoraConfig, get_peft_model  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from loraplan.catalog import model_entries  # noqa: E402

CFG = LlamaConfig(**{k: v for k, v in model_entries()["tiny-llama"]["config"].items()
                     if k not in ("architectures", "model_type")})
rec = []
orig_ag, orig_rs = dist.all_gather_single, dist.reduce_scatter_single


def ag(*a, **k):
    out = a[0] if a else k["output_tensor"]
    rec.append(("all_gather", out.numel() * out.element_size()))
    return orig_ag(*a, **k)


def rs(*a, **k):
    inp = a[1] if len(a) > 1 else k["input"]
    rec.append(("reduce_scatter", inp.numel() * inp.element_size()))
    return orig_rs(*a, **k)


dist.all_gather_single, dist.reduce_scatter_single = ag, rs


def run(strategy, gc=False, reshard=True, mp=False):
    torch.manual_seed(0)
    m = LlamaForCausalLM(CFG).to(torch.bfloat16)
    m.config.use_cache = False
    if gc:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.enable_input_require_grads()
    m = get_peft_model(m, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    rec.clear()
    if strategy == "ddp":
        model = DDP(m)

        def hook(state, bucket):
            b = bucket.buffer()
            rec.append(("all_reduce", b.numel() * b.element_size()))
            fut = torch.futures.Future()
            fut.set_result(b)
            return fut

        model.register_comm_hook(None, hook)
    else:
        kw = {"mesh": init_device_mesh("cpu", (2,)), "reshard_after_forward": reshard}
        if mp:
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
        # peft utils/other.py::fsdp_auto_wrap_policy: leaves with a trainable weight, the decoder layers; the root
        for mod in m.modules():
            if not list(mod.children()) and getattr(mod, "weight", None) is not None and mod.weight.requires_grad:
                fully_shard(mod, **kw)
        for layer in m.base_model.model.model.layers:
            fully_shard(layer, **kw)
        # accelerate utils/fsdp_utils.py::fsdp2_prepare_model: the input embedding its own unit, the final
        # norm + lm_head a unit kept after forward, the root with the None heuristic (not resharded)
        inner = m.base_model.model
        fully_shard(inner.model.embed_tokens, **kw)
        fully_shard([inner.model.norm, inner.lm_head], **{**kw, "reshard_after_forward": False})
        fully_shard(m, **{k: v for k, v in kw.items() if k != "reshard_after_forward"})
        model = m
    ids = torch.randint(0, CFG.vocab_size, (2, 128))
    model(input_ids=ids, labels=ids).loss.backward()
    out = {}
    for op, b in rec:
        o = out.setdefault(op, [0, 0])
        o[0] += b
        o[1] += 1
    return out


print(json.dumps({"ddp": run("ddp"), "fsdp2": run("fsdp"), "fsdp2_sgo": run("fsdp", reshard=False),
                  "fsdp2_mp": run("fsdp", mp=True)}))
