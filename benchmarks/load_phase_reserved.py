"""Does the model *load* move peak reserved? The replays start from the built model; a real
``from_pretrained(..., device_map={"": 0})`` (the H100 protocol, loraplan/data/h100-protocol.md)
reaches it differently, and peak reserved keeps what the load leaves cached
(``reset_peak_memory_stats`` resets the peak to the *current* reserved, not to allocated).

For each H100 reference case this replays the synthetic step stream (``loraplan.estimate.reserved``,
within ~2% of the trace replays there) twice through ``loraplan.allocator``: as loraplan does
(weights allocated in build order, then the steps), and with the load phase the libraries run:

1. transformers ``modeling_utils.py::caching_allocator_warmup`` (every load with a device map,
   transformers >= 4.51; 5.17 took the H100 measurements): ``torch.empty`` of
   ``get_total_byte_count`` bytes, freed at once, so one cached segment of that size: every
   parameter's elements x its element size, a quantized Linear weight x the quantizer's
   ``quantized_element_size`` (bnb 4-bit 0.5, 8-bit 1; ``quantizers/quantizer_bnb_*.py``), tied
   weights once; quantization state and LoRA are not counted;
2. the weights in build order (``reserved.weight_tensors``), a quantized base's other params in
   bf16 as loaded;
3. quantized bases: peft ``utils/other.py::prepare_model_for_kbit_training`` casts every bf16 param
   that is not ``Params4bit`` to fp32 (a new fp32 tensor, the bf16 one freed) and then calls
   ``torch.cuda.empty_cache()`` (frees only unsplit cached segments);
4. LoRA A/B (``get_peft_model``), then the steps.

Not modelled (said, not guessed): the bf16 copy each quantized weight passes through on the GPU
while it loads (``integrations/bitsandbytes.py::Bnb4bitQuantize``; up to ``GLOBAL_WORKERS`` = 4
loads in flight, ``core_model_loading.py``): its segments are unsplit once freed, so the
``empty_cache`` of step 3 releases those outside the warmup segment.

    python benchmarks/load_phase_reserved.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from trace_vs_reference import DATA, case_specs  # noqa: E402

from loraplan.allocator import CachingAllocator, replay  # noqa: E402
from loraplan.estimate import reserved as R  # noqa: E402
from loraplan.hf import spec_from_config  # noqa: E402
from loraplan.targets import select_targets  # noqa: E402
from loraplan.trace import emulation as em  # noqa: E402

MiB = 2**20
#: transformers quantizers' ``quantized_element_size`` (bytes per element of a quantized weight)
QUANTIZED_ELEMENT_SIZE = {"nf4": 0.5, "fp4": 0.5, "int8": 1.0}
LOAD_DTYPE_BYTES = 2  # the protocol loads in bf16


def load_phase_events(tensors, quantized: bool, qsize: float) -> list[tuple]:
    """Steps 1-4 of the module docstring as replay events; the weights keep the keys
    ``("w", i)`` of ``reserved._events`` (i: the index in ``tensors``), so the step events follow."""
    warm = sum(int(n * qsize) if k == "quantized" else n * LOAD_DTYPE_BYTES
               for k, _, n in tensors if k in ("param", "quantized"))
    ev: list[tuple] = [("alloc", "warmup", warm), ("free", "warmup")]
    cast = [i for i, (k, _, _) in enumerate(tensors) if k == "param" and quantized]
    for i, (k, nb, n) in enumerate(tensors):
        if k != "lora":
            ev.append(("alloc", ("w", i) if i not in cast else ("bf16", i), n * LOAD_DTYPE_BYTES if i in cast else nb))
    if quantized:
        for i in cast:
            ev += [("alloc", ("w", i), tensors[i][1]), ("free", ("bf16", i))]
        ev.append(("empty_cache",))
    ev += [("alloc", ("w", i), nb) for i, (k, nb, _) in enumerate(tensors) if k == "lora"]
    return ev, warm


def main() -> int:
    data = json.loads(DATA.read_text())
    ws = em.cublas_workspace_bytes("9.0")
    # allocated differs a little too: an unsplit block (remainder <= 1 MiB) counts whole (should_split)
    print(f"{'case':40s} {'allocated':>9s} {'+load':>9s} {'reserved':>9s} {'+load':>9s} {'change':>7s} {'warmup':>8s}  (MiB)")
    changes = []
    for case in data["cases"]:
        lora, train = case_specs(case)
        model = spec_from_config(data["models"][case["model"]], case["model"])
        adapted = select_targets(model, lora.targets)
        tensors = R.weight_tensors(model, adapted, train.quant, train.double_quant, lora.rank)
        script = R.step_script(model, lora, train, adapted, "9.0", (ws, ws))
        events = R._events([nb for _, nb, _ in tensors], script, 2)
        base = replay(events)
        step = events[len(tensors):]
        quantized = train.quant in QUANTIZED_ELEMENT_SIZE
        load, warm = load_phase_events(tensors, quantized, QUANTIZED_ELEMENT_SIZE.get(train.quant, LOAD_DTYPE_BYTES))
        a = CachingAllocator()
        replay(load, allocator=a)
        a.reset_peak_stats()  # the protocol's reset_peak_memory_stats() after the load
        r = replay(step, allocator=a)
        ch = 100.0 * (r.peak_reserved - base.peak_reserved) / base.peak_reserved
        changes.append(ch)
        print(f"{case['id']:40s} {base.peak_allocated / MiB:9.1f} {r.peak_allocated / MiB:9.1f} {base.peak_reserved / MiB:9.1f} "
              f"{r.peak_reserved / MiB:9.1f} {ch:+6.1f}% {warm / MiB:8.1f}", flush=True)
    print(f"\nload phase vs built-model start: peak reserved change from {min(changes):+.1f}% to {max(changes):+.1f}% "
          f"(raised on {sum(c > 0 for c in changes)}/{len(changes)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
