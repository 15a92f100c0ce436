"""loraplan: will a LoRA/QLoRA fine-tuning run fit, how fast is it, on which GPU, at what cost.

Three views of one training step:
- analytic (``loraplan.estimate``): pure Python, itemised ledger, microseconds;
- trace (``loraplan.trace``): the real transformers+peft step on the meta device;
- measured (``loraplan.profile``): short real bursts on a GPU (or CPU in CI).

The package import stays light: torch, transformers and pandas are never imported here.
"""

__version__ = "0.1.0"
