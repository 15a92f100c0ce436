"""The case options shared by estimate, plan, sweep and profile (names are a public contract).

Single-valued commands (estimate, plan) use ``case_options()``; grid commands (sweep,
profile) use ``case_options(multi=True)``, where every option takes comma lists or ranges
(``--seq 512:8192:x2``, ``--rank 8:64:+8``). Parsing, defaults and validation live in
``loraplan.case``; this module only declares the click options.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import click

from ..case import DEFAULTS
from ..spec import (ATTN_IMPLEMENTATIONS, DEEPSPEED_BUCKETS, FLOAT_DTYPES, FSDP_BACKWARD_PREFETCHES, FSDP_SHARDINGS, LOOP_OUTPUTS, LOSSES, MIXED_PRECISION, OPTIMIZERS, PADDINGS, QUANT_STORAGES,
                    QUANTS, STRATEGIES, TRAINERS)


def case_options(multi: bool = False, gpu: bool = True, config_in_json: bool = False):
    """Decorator adding the case options. With ``multi`` each takes a comma list / range string.

    It also adds ``--config FILE`` (a TRL/Transformers or axolotl recipe, ``loraplan.recipes``):
    the file's values fill the options the command line leaves unset, before the command runs;
    the account of its keys goes to stderr, or with ``config_in_json`` and ``--format json``
    into the command's JSON (``click.get_current_context().meta['loraplan.config']``).
    """
    m = " (comma list or range a:b:xK / a:b:+K)" if multi else ""
    c = " (comma list)" if multi else ""  # choices: no ranges

    def deco(f):
        opts = [
            click.option("--model", default=None if multi else DEFAULTS["model"], show_default=not multi,
                         help="Catalog name (see 'loraplan models'), a folder with config.json, or a config.json path" + (" (comma list)" if multi else "")),
            click.option("--quant", default=None, help=f"Base weights: {', '.join(QUANTS)} [default: nf4]" + c),
            click.option("--double-quant/--no-double-quant", default=None,
                         help="4-bit only: bitsandbytes double quantization of absmax [default: on]"),
            click.option("--rank", default=None, help="LoRA rank r [default: 8]" + m),
            click.option("--alpha", default=None, help="LoRA alpha [default: 2 x rank]" + m),
            click.option("--dropout", default=None, help="LoRA dropout [default: 0.05]" + m),
            click.option("--targets", default=None, multiple=multi,
                         help="LoRA target modules: comma list of module names, 'all-linear', or "
                              "'all-linear,lm_head'; MoE experts: 'experts' or 'experts.gate_up_proj' (PEFT target_parameters, "
                              "needs --dropout 0) [default: PEFT's default for the family, e.g. q_proj,v_proj]" + (" (repeat the option for several sets)" if multi else "")),
            click.option("--optimizer", default=None, help=f"{', '.join(OPTIMIZERS)} [default: adamw]" + c),
            click.option("--batch", default=None, help="Micro-batch size [default: 1]" + m),
            click.option("--seq", default=None, help="Sequence length in tokens [default: 512]" + m),
            click.option("--target-seq", default=None, help="Decoder length for encoder-decoder models [default: --seq]" + m),
            click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None,
                         help="Non-reentrant gradient checkpointing per decoder layer [default: on]"),
            click.option("--attention", default=None,
                         help="Attention kernel: auto (as CUDA picks it), flash, efficient, math, eager [default: auto]" + c),
            click.option("--int8-outlier-fraction", default=None,
                         help="int8 only: share of Linear input columns above the 6.0 outlier threshold "
                              "[default: measured for random-init weights; trained models have fewer]" + m),
            # the training stack (issue 11): unset values are the trainer's defaults (loraplan/data/trainers.json)
            click.option("--trainer", default=None,
                         help=f"Who runs the step: {', '.join(TRAINERS)} -- loop: a plain PyTorch loop (the H100 reference "
                              "protocol); hf: transformers.Trainer; trl: trl.SFTTrainer. Unset settings below take that "
                              "trainer's defaults [default: loop]" + c),
            click.option("--mixed-precision", default=None,
                         help=f"Autocast dtype: {', '.join(MIXED_PRECISION)} (fp16 adds a GradScaler) "
                              "[default: the trainer's: loop/hf no, trl bf16]" + c),
            click.option("--load-dtype", default=None,
                         help=f"dtype from_pretrained loads the unquantized parts in: {', '.join(FLOAT_DTYPES)} "
                              "(fp32: loading without a dtype in transformers 4 or trl's model-id path) [default: bf16; "
                              "a bf16/fp16/fp32 --quant loads as itself]" + c),
            click.option("--prepare-kbit/--no-prepare-kbit", default=None,
                         help="peft.prepare_model_for_kbit_training before get_peft_model (casts unquantized "
                              "params to fp32) [default: loop/hf on for quantized bases, trl off]"),
            click.option("--compute-dtype", default=None,
                         help=f"4-bit only: bnb_4bit_compute_dtype, {', '.join(FLOAT_DTYPES)} "
                              "[default: loop bf16; hf/trl fp32, BitsAndBytesConfig's default]" + c),
            click.option("--adapter-dtype", default=None,
                         help=f"LoRA A/B dtype: {', '.join(FLOAT_DTYPES)} [default: fp32 (peft autocast_adapter_dtype); "
                              "trl with a quantized base: bf16]" + c),
            click.option("--gradient-accumulation", default=None,
                         help="Micro-steps per optimizer step (--batch is the micro-batch) [default: 1]" + m),
            click.option("--max-grad-norm", default=None,
                         help="Gradient clipping norm; 0 turns it off [default: loop 0, hf/trl 1.0]" + m),
            click.option("--reentrant/--no-reentrant", default=None,
                         help="Reentrant gradient checkpointing (use_reentrant=True) [default: loop/trl off; hf: "
                              "the transformers version's (off since 5.0)]"),
            click.option("--attn-implementation", default=None,
                         help=f"transformers attn_implementation: {', '.join(ATTN_IMPLEMENTATIONS)} [default: sdpa]" + c),
            click.option("--padding", default=None,
                         help=f"How rows are filled: {', '.join(PADDINGS)} (longest: pass --lengths) "
                              "[default: max-length]" + c),
            click.option("--lengths", default=None,
                         help="Token counts of the dataset's rows: a comma list (e.g. p50,p99,max) or a file of counts; "
                              "the peak follows the worst batch"),
            click.option("--loss", default=None,
                         help=f"Loss path: {', '.join(LOSSES)}. chunked: trl's fused chunked LM head "
                              "(trl.trainer.utils.add_fused_lm_head + model(..., fused_lm_head=True); a loop can "
                              "call it too), liger: Liger's fused linear cross-entropy; neither holds the B*T*V "
                              "logits. hf has standard/liger, trl only chunked [default: loop/hf standard, "
                              "trl chunked]" + c),
            click.option("--loop-outputs", default=None,
                         help=f"--trainer loop only: how long the loop keeps the model's output (its B*T*V logits): "
                              f"{', '.join(LOOP_OUTPUTS)} -- dropped: loss = model(**batch).loss (the H100 protocol's "
                              "loop); micro-step: outputs = model(**batch) ... outputs = None at the end of the "
                              "micro-step; next-forward: outputs = model(**batch) rebound only when the next forward "
                              "returns (the transformers course's loop) [default: dropped]" + c),
            click.option("--checkpoint-every-n-layers", default=None,
                         help="Checkpoint every n-th decoder layer (transformers >= 5) [default: 1]" + m),
            click.option("--checkpoint-offload/--no-checkpoint-offload", default=None,
                         help="Hold checkpointed inputs in host memory (transformers >= 5 offload) [default: off]"),
            # several GPUs (issue 13)
            click.option("--strategy", default=None,
                         help=f"How the job spreads over GPUs: {', '.join(STRATEGIES)} -- ddp: DistributedDataParallel; "
                              "fsdp: FullyShardedDataParallel / fully_shard (fsdp-offload: with CPU offload); zero1-3: "
                              "DeepSpeed ZeRO stages (zero3-offload: params and optimizer on CPU); device-map: "
                              "accelerate's layer split [default: single]" + c),
            click.option("--num-gpus", default=None, help="GPUs in the job (world size) [default: 1]" + m),
            click.option("--nodes", default=None, help="Machines the GPUs sit in [default: 1]" + m),
            click.option("--fsdp-sharding", default=None,
                         help=f"FSDP sharding: {', '.join(FSDP_SHARDINGS)} (FULL_SHARD / SHARD_GRAD_OP / HYBRID_SHARD) "
                              "[default: full]" + c),
            click.option("--fsdp-version", default=None,
                         help="1: FullyShardedDataParallel (flat parameters), 2: fully_shard [default: the trainer's]" + c),
            click.option("--use-orig-params/--no-use-orig-params", default=None,
                         help="FSDP1 use_orig_params [default: the trainer's]"),
            click.option("--fsdp-backward-prefetch", default=None,
                         help=f"FSDP1 backward_prefetch: {', '.join(FSDP_BACKWARD_PREFETCHES)} (backward-pre keeps one "
                              "more unit gathered in backward; FSDP2 always prefetches one) [default: the trainer's: "
                              "loop backward-pre (torch), hf/trl none (accelerate)]" + c),
            click.option("--deepspeed-buckets", default=None,
                         help=f"ZeRO bucket sizes: {', '.join(DEEPSPEED_BUCKETS)} (auto: a config with 'auto' sizes, "
                              "filled from hidden_size by transformers/accelerate; deepspeed: none given, e.g. an "
                              "accelerate config without a DeepSpeed JSON: DeepSpeed's defaults) [default: loop "
                              "deepspeed, hf/trl auto]" + c),
            click.option("--quant-storage", default=None,
                         help=f"4-bit only: bnb_4bit_quant_storage, {', '.join(QUANT_STORAGES)} (FSDP-QLoRA needs a float "
                              "dtype) [default: uint8]" + c),
            click.option("--ram-efficient-loading/--no-ram-efficient-loading", default=None,
                         help="Only rank 0 loads the weights into host RAM and broadcasts them (accelerate "
                              "fsdp_cpu_ram_efficient_loading) [default: the trainer's]"),
        ]
        if not multi:
            opts.append(click.option("--stack", default=None,
                                     help="Library versions to assume, e.g. torch=2.11,transformers=5.17 (libraries: "
                                          "torch, transformers, peft, bitsandbytes) [default: the installed ones; "
                                          "without torch, the newest known set]"))
        if gpu:
            opts.append(click.option("--gpu", default=None if multi else DEFAULTS["gpu"], show_default=not multi,
                                     help="GPU id (see 'loraplan gpus')" + (" (comma list)" if multi else "")))
        opts.append(click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
                                 help="Read the recipe from a training config: TRL (trl sft --config YAML, SFTConfig/"
                                      "ModelConfig keys), Transformers TrainingArguments with LoraConfig/"
                                      "BitsAndBytesConfig sections (YAML or JSON), or an axolotl YAML. Sets --trainer "
                                      "from the file's kind (TRL: trl; TrainingArguments and axolotl: hf). Options "
                                      "given here override the file; used and ignored keys are listed"))
        wrapped = _with_config(f, multi, gpu, config_in_json)
        for o in reversed(opts):
            wrapped = o(wrapped)
        return wrapped
    return deco


def _with_config(f, multi: bool, gpu: bool, config_in_json: bool):
    """``f`` with ``--config`` applied to its case options first (loraplan.recipes.apply_recipe)."""
    from ..case import PARSERS

    @functools.wraps(f)
    def run(*args, config_file=None, **kw):
        from click.core import ParameterSource

        from ..case import check_given_options, config_no_ops

        ctx = click.get_current_context()
        keys = [k for k in PARSERS if k in kw and (gpu or k != "gpu")]
        typed = {k for k in keys if ctx.get_parameter_source(k) not in (ParameterSource.DEFAULT,
                                                                         ParameterSource.DEFAULT_MAP)
                 and kw.get(k) not in (None, ())}
        if config_file is not None:
            from ..recipes import apply_recipe, load_recipe

            recipe = load_recipe(config_file, model_given="model" in typed)
            case = {k: kw[k] for k in keys}
            case, overridden, unused = apply_recipe(recipe, case, typed, multi)
            # a real recipe may carry settings that do nothing with the rest of it (use_reentrant
            # with checkpointing off): listed as ignored, not refused (only typed options are)
            case, no_ops = config_no_ops(case, {k for k in keys if k not in typed}, multi)
            if no_ops:  # the file's key moves from "used" to "ignored", with the reason
                opt = {n: "--" + n.replace("_", "-") for n, _ in no_ops}
                file_key = {n: next((k for k, _, what in recipe.used if what.split()[0] == opt[n]), n)
                            for n, _ in no_ops}
                recipe = dataclasses.replace(
                    recipe, used=tuple(u for u in recipe.used if u[0] not in file_key.values()),
                    ignored=tuple(recipe.ignored) + tuple((file_key[n], why) for n, why in no_ops),
                    options={k: v for k, v in recipe.options.items() if k not in opt})
            kw.update(case)
            ctx.meta["loraplan.config"] = {**recipe.to_dict(), "overridden_by_command_line": list(overridden),
                                           "not_used_by_this_command": list(unused)}
            if not (config_in_json and kw.get("fmt") == "json"):
                for line in recipe.lines(overridden, unused):
                    click.echo(line, err=True)
        if not multi:  # grids: case.check_grid_options, once the grid file is merged in
            check_given_options({k: kw[k] for k in keys}, typed)
        return f(*args, **kw)
    return run


class Seconds(click.FloatRange):
    """A time limit: a finite number of seconds > 0. click's FloatRange lets NaN through (every
    comparison with NaN is false) and takes inf; both are refused here."""

    name = "seconds"

    def __init__(self):
        super().__init__(min=0, min_open=True)

    def convert(self, value, param, ctx):
        v = super().convert(value, param, ctx)
        if not math.isfinite(v):
            self.fail(f"{v} is not a finite number of seconds (e.g. 600)", param, ctx)
        return v


def trace_timeout_option(f):
    """``--trace-timeout``: shared by the commands that can run the meta-device trace."""
    return click.option("--trace-timeout", type=Seconds(), default=300.0,
                        show_default=True, help="Seconds one case's trace may take")(f)
