"""The case options shared by estimate, plan, sweep and profile (names are a public contract).

Single-valued commands (estimate, plan) use ``case_options()``; grid commands (sweep,
profile) use ``case_options(multi=True)``, where every option takes comma lists or ranges
(``--seq 512:8192:x2``, ``--rank 8:64:+8``). Parsing, defaults and validation live in
``loraplan.case``; this module only declares the click options.
"""

from __future__ import annotations

import click

from ..case import DEFAULTS
from ..spec import OPTIMIZERS, QUANTS


def case_options(multi: bool = False, gpu: bool = True):
    """Decorator adding the case options. With ``multi`` each takes a comma list / range string."""
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
        ]
        if not multi:
            opts.append(click.option("--stack", default=None,
                                     help="Library versions to assume, e.g. torch=2.11,transformers=5.17 (libraries: "
                                          "torch, transformers, peft, bitsandbytes) [default: the installed ones; "
                                          "without torch, the newest known set]"))
        if gpu:
            opts.append(click.option("--gpu", default=None if multi else DEFAULTS["gpu"], show_default=not multi,
                                     help="GPU id (see 'loraplan gpus')" + (" (comma list)" if multi else "")))
        for o in reversed(opts):
            f = o(f)
        return f
    return deco


def trace_timeout_option(f):
    """``--trace-timeout``: shared by the commands that can run the meta-device trace."""
    return click.option("--trace-timeout", type=click.FloatRange(min=0, min_open=True), default=300.0,
                        show_default=True, help="Seconds one case's trace may take")(f)
