"""Recipes from the files users keep: a TRL / Transformers training config or an axolotl YAML.

``load_recipe(path)`` reads one YAML or JSON file and maps every key onto loraplan's case
options (``loraplan.case.PARSERS`` names: ``rank``, ``mixed_precision``, ``seq`` ...), so that
``resolve_case`` turns it into ``LoraSpec``/``TrainSpec`` like a command line would. Every key
is accounted for: *used* (the option it set, and how), *ignored* (with the reason), or an
``InputError`` (one line naming the key or value and the fix) for an unknown key or a value
loraplan cannot model. Settings the file leaves unset take the library's default, listed under
*defaults* with the library source (a TrainingArguments file without ``per_device_train_batch_size``
trains batches of 8, not loraplan's 1).

File kinds (``Recipe.kind``) and the trainer each one runs:

* ``trl``: ``trl sft --config`` YAML, flat (SFTConfig + ModelConfig + ScriptArguments keys,
  trl/scripts/sft.py::main via ``TrlParser``) or in sections. Runs ``trl.SFTTrainer`` -> ``--trainer trl``.
* ``hf``: ``TrainingArguments`` / ``Seq2SeqTrainingArguments`` keys (``TrainingArguments.to_json_string()``
  or sections, with ``LoraConfig`` / ``BitsAndBytesConfig`` / ``from_pretrained`` sections). Runs
  ``transformers.Trainer`` -> ``--trainer hf``.
* ``axolotl``: an axolotl YAML. axolotl builds ``transformers.TrainingArguments`` and trains with
  its ``AxolotlTrainer``, a subclass of ``transformers.Trainer`` that keeps ``training_step`` /
  ``compute_loss`` (axolotl core/trainers/base.py), so it runs as ``--trainer hf``.
* ``loraplan``: only a ``loraplan:`` section of case options (for recipes of other stacks, e.g.
  LitGPT's own loop -> ``--trainer loop``). Any file may carry a ``loraplan:`` section for what its
  format keeps elsewhere (the row length of a Trainer script, ``--lengths``, ``--gpu``).

Sections a file may have (names as users write them): training arguments (``training_args``,
``args``, ``TrainingArguments``, ``Seq2SeqTrainingArguments``, ``SFTConfig``, ``sft_config``),
``lora`` (``lora_config``, ``LoraConfig``, ``peft_config``), ``bnb`` (``bnb_config``,
``quantization_config``, ``BitsAndBytesConfig``), ``model`` (``from_pretrained`` keyword
arguments or ``ModelConfig``), ``tokenizer`` (``max_length``, ``padding``), ``script_args``
(``ScriptArguments``), ``prepare_model_for_kbit_training`` (bool or its kwargs),
``get_peft_model`` (``autocast_adapter_dtype``) and ``loraplan``. Pure Python (PyYAML, no torch).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError, InputError, suggest

#: why an ignored key is ignored
NO_EFFECT = "does not change memory or step time"

# ---- vocabulary -------------------------------------------------------------------------------

#: keys of TrainingArguments / SFTConfig / ModelConfig / ScriptArguments / LoraConfig /
#: BitsAndBytesConfig / axolotl that do not change the peak memory or the time of a training step
#: (schedules, logging, saving, evaluation, hub, data loading, seeds, names and paths)
IRRELEVANT = frozenset("""
output_dir overwrite_output_dir run_name project report_to logging_dir logging_strategy logging_steps
logging_first_step logging_nan_inf_filter log_level log_level_replica log_on_each_node disable_tqdm
learning_rate lr_scheduler_type lr_scheduler_kwargs warmup_steps warmup_ratio weight_decay adam_beta1
adam_beta2 adam_epsilon num_train_epochs max_steps seed data_seed full_determinism save_strategy
save_steps save_total_limit save_only_model save_on_each_node save_safetensors eval_strategy
evaluation_strategy eval_steps eval_delay eval_on_start eval_accumulation_steps eval_do_concat_batches
eval_use_gather_object per_device_eval_batch_size batch_eval_metrics prediction_loss_only do_train
do_eval do_predict load_best_model_at_end metric_for_best_model greater_is_better include_for_metrics
include_num_input_tokens_seen include_tokens_per_second hub_model_id hub_strategy hub_token
hub_private_repo hub_always_push hub_revision push_to_hub resume_from_checkpoint
restore_callback_states_from_checkpoint ignore_data_skip dataloader_drop_last dataloader_num_workers
dataloader_pin_memory dataloader_persistent_workers dataloader_prefetch_factor dataloader_in_order
dataloader_multiprocessing_context remove_unused_columns label_names length_column_name
group_by_length train_sampling_strategy skip_memory_metrics debug trackio_space_id trackio_bucket_id
trackio_static_space_id local_rank ddp_backend ddp_timeout ddp_find_unused_parameters
ddp_bucket_cap_mb ddp_broadcast_buffers ddp_static_graph accelerator_config average_tokens_across_devices
torch_empty_cache_steps generation_config generation_max_length generation_num_beams predict_with_generate
sortish_sampler use_cache enable_jit_checkpoint qalora_group_size runtime_config ensure_weight_tying
dataset_text_field dataset_kwargs dataset_num_proc eos_token pad_token chat_template_path
completion_only_loss assistant_only_loss shuffle_dataset truncation_mode eval_packing pad_to_multiple_of
dataset_name dataset_config dataset_train_split dataset_test_split dataset_streaming ignore_bias_buffers
model_revision revision trust_remote_code device_map low_cpu_mem_usage
task_type lora_task_type inference_mode init_lora_weights fan_in_fan_out peft_version auto_mapping
bnb_4bit_quant_storage quant_method
tokenizer_type tokenizer_config tokenizer_use_fast tokenizer_legacy model_type base_model_config
strict datasets test_datasets dataset_prepared_path push_dataset_to_hub val_set_size
train_on_inputs lora_model_dir lora_fan_in_fan_out lora_on_cpu wandb_project wandb_entity wandb_watch
wandb_name wandb_run_id wandb_log_model mlflow_tracking_uri mlflow_experiment_name num_epochs
lr_scheduler optimizer_kwargs warmup_ratio evals_per_epoch saves_per_epoch logging_steps
early_stopping_patience chat_template special_tokens hub_model_id hf_use_auth_token
dataset_processes shuffle_merged_datasets is_llama_derived_model is_mistral_derived_model
is_falcon_derived_model is_qwen_derived_model torchdistx_path gptq_groupsize gptq_model_v1
save_first_step auto_resume_from_checkpoints loss_watchdog_threshold loss_watchdog_patience
""".split())

#: keys whose default (False / None / empty) changes nothing, but whose non-default value is a
#: setting loraplan does not model: value -> InputError naming the key
_UNMODELLED = {
    "deepspeed": "loraplan models one GPU without DeepSpeed; remove 'deepspeed'",
    "fsdp": "loraplan models one GPU without FSDP; remove 'fsdp'",
    "parallelism_config": "loraplan models one GPU; remove 'parallelism_config'",
    "torch_compile": "torch.compile changes which activations are kept and is not modelled; set it false",
    "use_cpu": "the training step on CPU is what 'loraplan profile --device cpu' measures; remove 'use_cpu'",
    "bf16_full_eval": "evaluation in bf16 is not modelled (loraplan predicts the training step); remove it",
    "fp16_full_eval": "evaluation in fp16 is not modelled (loraplan predicts the training step); remove it",
    "label_smoothing_factor": "label smoothing keeps a log-softmax of the logits that loraplan does not model; set it 0",
    "neftune_noise_alpha": "NEFTune adds a noise tensor to the embeddings that loraplan does not model; remove it",
    "optim_args": "optimizer arguments are not modelled; remove 'optim_args'",
    "optim_target_modules": "GaLore/APOLLO optimizers are not modelled; remove 'optim_target_modules'",
    "activation_offloading": "trl's activation offloading (every saved tensor to host) is not modelled; "
                             "use gradient_checkpointing_kwargs: {offload: true} or remove it",
    "use_dora": "DoRA keeps a weight-norm per layer that loraplan does not model; set it false",
    "modules_to_save": "modules_to_save trains full copies of whole modules, which loraplan does not model; remove it",
    "lora_modules_to_save": "modules_to_save trains full copies of whole modules, which loraplan does not model; remove it",
    "layers_to_transform": "LoRA on a subset of layers is not modelled; remove 'layers_to_transform'",
    "layers_pattern": "LoRA on a subset of layers is not modelled; remove 'layers_pattern'",
    "rank_pattern": "per-module ranks are not modelled; remove 'rank_pattern'",
    "alpha_pattern": "per-module alphas are not modelled; remove 'alpha_pattern'",
    "exclude_modules": "excluded modules are not modelled; list the targets in target_modules instead",
    "lora_bias": "trainable LoRA biases are not modelled; set it false",
    "use_qalora": "QA-LoRA is not modelled; set it false",
    "use_bdlora": "BD-LoRA is not modelled; set it false",
    "layer_replication": "layer replication is not modelled; remove it",
    "trainable_token_indices": "trainable token rows are not modelled; remove it",
    "loftq_config": "LoftQ initialisation is not modelled; remove it",
    "alora_invocation_tokens": "activated LoRA is not modelled; remove it",
    "arrow_config": "Arrow routing is not modelled; remove it",
    "corda_config": "CorDA initialisation is not modelled; remove it",
    "eva_config": "EVA initialisation is not modelled; remove it",
    "kasa_config": "KaSA is not modelled; remove it",
    "lora_ga_config": "LoRA-GA is not modelled; remove it",
    "monteclora_config": "MonteCLoRA is not modelled; remove it",
    "velora_config": "VeLoRA is not modelled; remove it",
    "megatron_config": "Megatron layers are not modelled; remove it",
    "llm_int8_skip_modules": "bnb modules kept unquantized are not modelled; remove 'llm_int8_skip_modules'",
    "llm_int8_enable_fp32_cpu_offload": "CPU offload of modules is not modelled; set it false",
    "llm_int8_has_fp16_weight": "int8 with fp16 master weights is not modelled; set it false",
    "xformers_attention": "xformers attention is not modelled; use flash_attention, sdp_attention or eager_attention",
    "flex_attention": "flex attention is not modelled; use flash_attention, sdp_attention or eager_attention",
    "s2_attention": "shifted-sparse attention is not modelled; remove it",
    "unsloth_lora_mlp": "unsloth kernels are not modelled; remove it",
    "unsloth_lora_qkv": "unsloth kernels are not modelled; remove it",
    "unsloth_lora_o": "unsloth kernels are not modelled; remove it",
    "unsloth_cross_entropy_loss": "unsloth kernels are not modelled; remove it",
    "gpu_memory_limit": "a per-GPU memory cap with offload is not modelled; remove it",
    "relora_steps": "ReLoRA is not modelled; remove it",
    "tokens": "added tokens resize the embeddings, which is not modelled; remove 'tokens'",
    "fsdp_version": "loraplan models one GPU without FSDP; remove it",
    "context_parallel_size": "loraplan models one GPU; remove it",
    "tensor_parallel_size": "loraplan models one GPU; remove it",
    "sequence_parallel_degree": "loraplan models one GPU; remove it",
}

#: keys that are only read together with another key (which loraplan checks): key -> reason
_ONLY_WITH = {
    "fsdp_config": "read only when fsdp is set (fsdp is checked)",
    "torch_compile_backend": "read only with torch_compile (torch_compile is checked)",
    "torch_compile_mode": "read only with torch_compile (torch_compile is checked)",
    "deepspeed_plugin": "read only with deepspeed (deepspeed is checked)",
    "megatron_core": "read only with megatron_config (megatron_config is checked)",
}

#: default values of _UNMODELLED keys that mean "off" beyond False/None/empty/0
_OFF_VALUES = {"deepspeed": ("",), "fsdp": ("", []), "parallelism_config": (), "torch_compile_backend": (),
               "label_smoothing_factor": (0, 0.0), "lora_bias": (False,)}

#: HF ``optim`` names (transformers training_args.py::OptimizerNames) and axolotl ``optimizer``
#: -> loraplan --optimizer, with a note where the mapping is not exact
OPTIM_NAMES: dict[str, tuple[str, str]] = {
    "adamw_torch": ("adamw", ""),
    "adamw_torch_fused": ("adamw", "the fused kernel keeps no foreach temporaries; loraplan models torch's foreach "
                                    "AdamW, so the optimizer-step transient may read slightly high"),
    "adamw_hf": ("adamw", "transformers' old AdamW; read as torch.optim.AdamW"),
    "adamw": ("adamw", ""),
    "adamw_bnb_8bit": ("adamw_8bit", ""),
    "adamw_8bit": ("adamw_8bit", ""),
    "adamw_torch_8bit": ("adamw_8bit", ""),
    "paged_adamw_8bit": ("paged_adamw_8bit", ""),
    "paged_adamw_32bit": ("paged_adamw_32bit", ""),
    "paged_adamw": ("paged_adamw_32bit", "bitsandbytes PagedAdamW is 32-bit"),
    "sgd": ("sgd", ""),
}

#: dtype spellings (torch names, strings of torch names, short names) -> loraplan dtype
_DTYPES = {"bfloat16": "bf16", "torch.bfloat16": "bf16", "bf16": "bf16",
           "float16": "fp16", "torch.float16": "fp16", "fp16": "fp16", "half": "fp16",
           "float32": "fp32", "torch.float32": "fp32", "fp32": "fp32", "float": "fp32"}

_SECTIONS = {
    "training_args": "args", "training_arguments": "args", "args": "args", "trainingarguments": "args",
    "seq2seqtrainingarguments": "args", "sftconfig": "args", "sft_config": "args",
    "lora": "lora", "lora_config": "lora", "loraconfig": "lora", "peft_config": "lora",
    "bnb": "bnb", "bnb_config": "bnb", "quantization_config": "bnb", "bitsandbytesconfig": "bnb",
    "model": "model", "model_args": "model", "modelconfig": "model", "from_pretrained": "model",
    "model_init_kwargs": "model",
    "tokenizer": "tokenizer", "script_args": "script", "scriptarguments": "script",
    "prepare_model_for_kbit_training": "prepare", "get_peft_model": "get_peft_model", "loraplan": "loraplan",
}

#: keys that only trl's configs have (SFTConfig beyond TrainingArguments, ModelConfig, ScriptArguments)
_TRL_KEYS = frozenset("""max_length max_seq_length packing packing_strategy padding_free dataset_text_field
dataset_kwargs dataset_num_proc completion_only_loss assistant_only_loss loss_type activation_offloading
model_init_kwargs chat_template_path eval_packing shuffle_dataset truncation_mode model_name_or_path use_peft
lora_r lora_target_modules lora_target_parameters lora_modules_to_save lora_task_type use_bnb_nested_quant
model_revision dataset_name dataset_config dataset_train_split dataset_test_split dataset_streaming""".split())

#: keys only axolotl has
_AXOLOTL_KEYS = frozenset("""base_model adapter sequence_len micro_batch_size sample_packing lora_target_linear
flash_attention sdp_attention eager_attention num_epochs datasets pad_to_sequence_len optimizer
dataset_prepared_path val_set_size base_model_config""".split())


# ---- the result -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """What a config file says, as case options, with an account of every key.

    ``options``: case option -> value (``loraplan.case.PARSERS`` keys; values as ``resolve_case``
    takes them). ``used``: (key, value, what it set). ``ignored``: (key, reason).
    ``defaults``: (option, value, source) for settings the file leaves to the library's default.
    """

    path: str
    kind: str  # trl | hf | axolotl | loraplan
    options: dict
    used: tuple = ()
    ignored: tuple = ()
    defaults: tuple = ()

    def to_dict(self) -> dict:
        """The account for JSON output (``inputs.config``)."""
        return {"path": self.path, "kind": self.kind, "trainer": self.options.get("trainer"),
                "options": {k: list(v) if isinstance(v, tuple) else v for k, v in self.options.items()},
                "used": [{"key": k, "value": _jsonable(v), "sets": s} for k, v, s in self.used],
                "ignored": [{"key": k, "reason": r} for k, r in self.ignored],
                "defaults": [{"option": o, "value": _jsonable(v), "source": s} for o, v, s in self.defaults]}

    def lines(self, overridden: tuple[str, ...] = (), unused: tuple[str, ...] = ()) -> list[str]:
        """Human-readable account, one line per key (the CLI prints it to stderr)."""
        out = [f"config {self.path}: {self.kind} recipe -> --trainer {self.options.get('trainer')}"]
        out += [f"  used     {k} = {_short(v)} -> {s}" for k, v, s in self.used]
        out += [f"  default  --{o.replace('_', '-')} {_short(v)} ({s})" for o, v, s in self.defaults]
        out += [f"  ignored  {k}: {r}" for k, r in self.ignored]
        if overridden:
            out.append("  the command line overrides: " + ", ".join("--" + o.replace("_", "-") for o in overridden))
        if unused:
            out.append("  not used by this command: " + ", ".join(f"--{o.replace('_', '-')} {_short(self.options[o])}"
                                                              for o in unused))
        return out


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return list(v)
    if isinstance(v, (str, int, float, bool, list, dict)) or v is None:
        return v
    return str(v)


def _short(v: Any) -> str:
    s = json.dumps(_jsonable(v)) if not isinstance(v, str) else v
    return s if len(s) <= 70 else s[:67] + "..."


# ---- reading ----------------------------------------------------------------------------------


def read_file(path: str | Path) -> dict:
    """A YAML or JSON file -> its top-level mapping. ConfigError (one line) when unreadable."""
    from .inputs import check_depth, read_text_file

    p = Path(path).expanduser()
    hint = "give a YAML or JSON training config"
    # a regular UTF-8 file of at most inputs.MAX_JSON_BYTES (a FIFO, /dev/zero or a folder is refused
    # before it is opened), brackets nested at most inputs.MAX_JSON_DEPTH deep, before a parser sees it
    text = read_text_file(p, "--config file", hint)
    check_depth(text, "--config file", str(path), hint)
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # yaml.YAMLError / json.JSONDecodeError: report the position, not a traceback
        msg = " ".join(str(e).split())
        raise ConfigError(f"--config {path} is not valid {'JSON' if p.suffix.lower() == '.json' else 'YAML'} "
                          f"({msg[:160]}); fix the syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path} holds a {type(data).__name__}, not a mapping of keys; "
                          f"give a TRL/Transformers training config or an axolotl YAML")
    return data


def load_recipe(path: str | Path, model_given: bool = False) -> Recipe:
    """Read ``path`` (YAML or JSON) into a Recipe.

    ``model_given``: the command line names the model, so a model in the file that loraplan
    cannot resolve is not an error. Raises ConfigError / InputError (one line) for an unreadable
    file, an unknown key, or a value loraplan cannot model.
    """
    data = read_file(path)
    sections: dict[str, dict] = {}
    flat: dict[str, Any] = {}
    for k, v in data.items():
        sec = _SECTIONS.get(str(k).lower())
        if sec is not None and isinstance(v, dict):
            if sec in sections:
                raise ConfigError(f"--config {path}: sections '{k}' and another name for the same section; "
                                  f"merge them into one")
            sections[sec] = {"__name__": str(k), **v}
        elif sec == "prepare" and isinstance(v, bool):
            sections[sec] = {"__name__": str(k), "__value__": v}
        else:
            flat[str(k)] = v
    kind = _kind(flat, sections)
    r = _Reader(str(path), kind)
    if kind == "axolotl":
        _read_axolotl(r, flat)
    else:
        _read_hf(r, flat, sections)
    r.resolve_model(model_given or "model" in sections.get("loraplan", {}))
    r.finish()
    for k, v in sections.get("loraplan", {}).items():  # last: it says outright what the file only implies
        if k != "__name__":
            r.loraplan(k, v)
    r.account_for_facts()
    return Recipe(path=str(path), kind=kind, options=dict(r.opts), used=tuple(r.used), ignored=tuple(r.ignored),
                  defaults=tuple(r.defaults))


def _kind(flat: dict, sections: dict) -> str:
    names = {s.get("__name__", "").lower() for s in sections.values()}
    keys = set(flat) | set(sections.get("args", {})) | set(sections.get("model", {}))
    if keys & _AXOLOTL_KEYS and not names - {"loraplan"}:
        return "axolotl"
    if not flat and set(sections) == {"loraplan"}:
        return "loraplan"
    if names & {"sftconfig", "sft_config", "model_init_kwargs", "modelconfig", "model_args", "scriptarguments",
                "script_args"} or keys & _TRL_KEYS:
        return "trl"
    return "hf"


class _Reader:
    """Collects options, the used/ignored account and the library defaults of one file."""

    def __init__(self, path: str, kind: str) -> None:
        self.path, self.kind = path, kind
        self.opts: dict[str, Any] = {}
        self.used: list = []
        self.ignored: list = []
        self.defaults: list = []
        self.model_name: str | None = None
        self.facts: dict[str, Any] = {}  # file facts read together at the end (quantization, dtypes, LoRA)
        self.keys_read: set[str] = set()  # file keys that became facts (each must end in the account)
        self.raws: dict[str, Any] = {}  # key -> the value as the file spells it (bfloat16, torch.float16)
        self.lora_section = False  # a LoraConfig section: peft's LoraConfig defaults, not trl ModelConfig's

    # -- bookkeeping
    def set(self, option: str, value: Any, key: str, raw: Any, how: str = "") -> None:
        if option in self.opts and self.opts[option] != value:
            prev = next((k for k, _, s in self.used if s.startswith(f"--{option.replace('_', '-')} ")), "another key")
            raise InputError(f"--config {self.path}: '{key}' sets --{option.replace('_', '-')} {_short(value)} but "
                             f"'{prev}' set {_short(self.opts[option])}; keep one of them")
        self.check(option, value, key)
        self.opts[option] = value
        raw = self.raws.get(key, raw)
        self.used.append((key, raw, f"--{option.replace('_', '-')} {_short(value)}" + (f" ({how})" if how else "")))

    def check(self, option: str, value: Any, key: str) -> None:
        """The option's own check (spec.CHECKS), its one-line error naming the file's key."""
        from .spec import CHECKS, check_value

        if option in CHECKS and option != "targets" and not key.startswith("loraplan."):
            try:
                check_value(option, value)
            except InputError as e:
                raise InputError(f"--config {self.path}: {key} {_short(self.raws.get(key, value))}: {e}") from None

    def fact(self, name: str, value: Any, key: str, raw: Any = None) -> None:
        self.facts[name] = (value, key)
        self.keys_read.add(key)
        if raw is not None:
            self.raws[key] = raw

    def note(self, key: str, raw: Any, how: str) -> None:
        self.used.append((key, raw, how))

    def ignore(self, key: str, reason: str = NO_EFFECT) -> None:
        self.ignored.append((key, reason))

    def default(self, option: str, value: Any, source: str) -> None:
        if option not in self.opts:
            self.opts[option] = value
            self.defaults.append((option, value, source))

    def bad(self, key: str, value: Any, fix: str) -> InputError:
        return InputError(f"--config {self.path}: {key} {_short(value)!s} {fix}")

    def unknown(self, key: str, vocabulary) -> InputError:
        return InputError(f"--config {self.path}: unknown key '{key}'{suggest(key, sorted(vocabulary))}; "
                          f"remove it or check its spelling (a {self.kind} recipe; see 'loraplan estimate --help')")

    # -- shared value readers
    def unmodelled(self, key: str, v: Any) -> None:
        if v in (None, False, "", [], {}, 0) or v in _OFF_VALUES.get(key, ()):
            self.ignore(key, "off (the default); " + NO_EFFECT)
        else:
            raise InputError(f"--config {self.path}: {key} {_short(v)}: {_UNMODELLED[key]}")

    def dtype(self, key: str, v: Any, allow_auto: bool = False) -> str | None:
        s = str(v).strip().lower()
        if allow_auto and s == "auto":
            return None
        if s in _DTYPES:
            return _DTYPES[s]
        raise self.bad(key, v, "is not a dtype loraplan knows; use bfloat16, float16 or float32"
                               + (" (or auto)" if allow_auto else ""))

    def boolean(self, key: str, v: Any) -> bool:
        if isinstance(v, bool):
            return v
        if isinstance(v, str) and v.strip().lower() in ("true", "false"):
            return v.strip().lower() == "true"
        raise self.bad(key, v, "must be true or false")

    def integer(self, key: str, v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise self.bad(key, v, "must be a positive integer")
        return v

    def number(self, key: str, v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self.bad(key, v, "must be a number")
        return float(v)

    def optim(self, key: str, v: Any) -> None:
        name = str(v).strip().lower()
        if name not in OPTIM_NAMES:
            raise self.bad(key, v, f"has no loraplan equivalent{suggest(name, sorted(OPTIM_NAMES))}; use one of "
                                   f"{', '.join(sorted(OPTIM_NAMES))}")
        opt, how = OPTIM_NAMES[name]
        self.set("optimizer", opt, key, v, how)

    def targets(self, key: str, v: Any) -> None:
        if v is None:
            self.ignore(key, "None: PEFT's default target modules for the model family")
            return
        if isinstance(v, str):  # 'all-linear', one name, or a regular expression (PEFT matches it whole)
            self.set("targets", "all-linear" if v.strip().lower() == "all-linear" else v, key, v)
            return
        if isinstance(v, (list, tuple)) and v and all(isinstance(x, str) for x in v):
            self.set("targets", ",".join(v), key, v)
            return
        raise self.bad(key, v, "must be a list of module names such as [q_proj, v_proj] or 'all-linear'")

    def loraplan(self, k: str, v: Any) -> None:
        from .case import PARSERS

        key = k.replace("-", "_")
        if key not in PARSERS:
            raise InputError(f"--config {self.path}: loraplan.{k} is not a loraplan option{suggest(key, sorted(PARSERS))}; "
                             f"use the names of 'loraplan estimate --help' (seq, lengths, gpu, ...)")
        val = ",".join(map(str, v)) if isinstance(v, list) and key in ("targets", "lengths") else v
        if key == "lengths" and isinstance(v, list):
            val = tuple(int(x) for x in v) if all(isinstance(x, int) for x in v) else val
        prev = self.opts.pop(key, None)  # the loraplan section says it outright: it wins over what the file implied
        self.defaults = [d for d in self.defaults if d[0] != key]
        differs = prev is not None and str(prev).lower() != str(val).lower()
        self.set(key, val, f"loraplan.{k}", v, f"instead of {_short(prev)} from the file" if differs else "")

    # -- model
    def model(self, key: str, v: Any) -> None:
        if not isinstance(v, str) or not v.strip():
            raise self.bad(key, v, "must be a model name or path")
        self.model_name = v.strip()
        self.fact("model_key", key, key)

    def resolve_model(self, given: bool) -> None:
        if self.model_name is None:
            if not given and "model" not in self.opts:
                self.defaults.append(("model", None, "the file names no model: give --model"))
            return
        key = self.facts["model_key"][0]
        name = resolve_model_name(self.model_name)
        if name is None:
            if given:
                self.ignore(key, f"'{self.model_name}' is not in loraplan's catalog; --model (or loraplan.model) "
                                 f"names the model instead")
                return
            from .catalog import model_entries

            near = suggest(self.model_name.rsplit("/", 1)[-1].lower(), sorted(model_entries()))
            raise InputError(f"--config {self.path}: {key} '{self.model_name}' is neither a catalog model nor a "
                             f"config.json path{near}; give --model with a catalog name (see 'loraplan models') or "
                             f"the path of its config.json")
        if "model" not in self.opts:
            self.set("model", name, key, self.model_name, "" if name == self.model_name else "catalog name")

    # -- facts read together (the same fact can come from several places: flat, sections, nested)
    def finish(self) -> None:
        f = {k: v[0] for k, v in self.facts.items()}
        fk = {k: v[1] for k, v in self.facts.items()}
        trainer = self.opts.get("trainer") or {"trl": "trl", "hf": "hf", "axolotl": "hf", "loraplan": "loop"}[self.kind]
        if "trainer" not in self.opts:
            self.opts["trainer"] = trainer
            self.defaults.append(("trainer", trainer, {
                "trl": "a trl config runs trl.SFTTrainer",
                "hf": "a TrainingArguments config runs transformers.Trainer",
                "axolotl": "axolotl's AxolotlTrainer subclasses transformers.Trainer (core/trainers/base.py)",
                "loraplan": "a loraplan recipe without --trainer: the plain loop"}[self.kind]))
        if self.kind == "loraplan":
            return
        # mixed precision (TrainingArguments bf16/fp16)
        bf16, fp16 = f.get("bf16"), f.get("fp16")
        if bf16 and fp16:
            raise InputError(f"--config {self.path}: bf16 and fp16 are both true; set one of them")
        if bf16 or fp16:
            self.set("mixed_precision", "bf16" if bf16 else "fp16", fk["bf16" if bf16 else "fp16"], True)
        elif "bf16" in f or "fp16" in f:
            if trainer == "trl" and "bf16" not in f:  # SFTConfig: bf16 defaults to True unless fp16 is set
                self.note(fk["fp16"], False, "no fp16: SFTConfig's bf16 default applies")
            else:
                self.set("mixed_precision", "no", fk.get("bf16") or fk["fp16"], False)
        # load dtype and the dtype of an unquantized base
        dtype = f.get("dtype")
        q4, q8 = f.get("load_in_4bit"), f.get("load_in_8bit")
        if q4 and q8:
            raise InputError(f"--config {self.path}: load_in_4bit and load_in_8bit are both true; set one of them")
        if q4:
            self.note(fk["load_in_4bit"], True, "a 4-bit bitsandbytes base")
            qt = f.get("quant_type")
            if qt is None:
                qt = "nf4" if self.kind in ("trl", "axolotl") else "fp4"
                self.defaults.append(("quant", qt, "trl ModelConfig.bnb_4bit_quant_type='nf4'" if self.kind == "trl"
                                      else "axolotl loads qlora as nf4" if self.kind == "axolotl"
                                      else "transformers BitsAndBytesConfig: bnb_4bit_quant_type='fp4'"))
                self.opts["quant"] = qt
            else:
                self.set("quant", qt, fk["quant_type"], qt)
            if "double_quant" in f:
                self.set("double_quant", f["double_quant"], fk["double_quant"], f["double_quant"])
            else:
                dq = self.kind == "axolotl"
                self.default("double_quant", dq, "axolotl's qlora BitsAndBytesConfig: bnb_4bit_use_double_quant=True"
                             if dq else "trl ModelConfig.use_bnb_nested_quant=False" if self.kind == "trl"
                             else "transformers BitsAndBytesConfig: bnb_4bit_use_double_quant=False")
            cd = f.get("compute_dtype")
            if cd is not None:
                self.set("compute_dtype", cd, fk["compute_dtype"], cd)
            elif self.kind == "trl" and "compute_dtype" not in f:
                # trl/trainer/utils.py::get_quantization_config: bnb_4bit_compute_dtype=model_args.dtype
                self.default("compute_dtype", dtype or "fp32", "trl get_quantization_config: bnb_4bit_compute_dtype = "
                             "ModelConfig.dtype (default float32)")
        elif q8:
            self.set("quant", "int8", fk["load_in_8bit"], True)
        if q4 or q8:
            if dtype is not None:
                self.set("load_dtype", dtype, fk["dtype"], dtype)
            elif self.kind == "trl" and not f.get("dtype_auto"):
                self.default("load_dtype", "fp32", "trl ModelConfig.dtype='float32' (trainer/utils.py::create_model_from_path)")
        else:
            base = dtype
            if base is None and self.kind == "trl" and not f.get("dtype_auto"):
                base = "fp32"
                self.defaults.append(("quant", base, "trl ModelConfig.dtype='float32'"))
                self.opts["quant"] = base
            elif base is None:
                base = self._checkpoint_dtype()
                self.defaults.append(("quant", base, "from_pretrained dtype 'auto': the checkpoint's dtype"
                                      if base != "bf16" or self.model_name else "the file names no dtype: bf16"))
                self.opts["quant"] = base
            else:
                self.set("quant", base, fk["dtype"], base, "unquantized base in its load dtype")
        # LoRA defaults of the file's vocabulary (peft LoraConfig r=8, lora_alpha=8, lora_dropout=0.0;
        # trl ModelConfig lora_r=16, lora_alpha=32, lora_dropout=0.05; axolotl lora_dropout 0.0)
        lib = {"trl": (16, 32.0, 0.05, "trl ModelConfig"), "hf": (8, 8.0, 0.0, "peft LoraConfig"),
               "axolotl": (8, 8.0, 0.0, "axolotl passes peft LoraConfig's defaults")}[self.kind]
        if self.kind == "trl" and self.lora_section:
            lib = (8, 8.0, 0.0, "peft LoraConfig")
        self.default("rank", lib[0], f"{lib[3]} r={lib[0]}")
        self.default("alpha", lib[1], f"{lib[3]} lora_alpha={lib[1]:g}")
        self.default("dropout", lib[2], f"{lib[3]} lora_dropout={lib[2]:g}")
        # batch and checkpointing defaults of TrainingArguments / SFTConfig
        if self.kind in ("trl", "hf"):
            self.default("batch", 8, "transformers TrainingArguments per_device_train_batch_size=8")
            gc = self.kind == "trl"
            self.default("gradient_checkpointing", gc, "trl SFTConfig gradient_checkpointing=True" if gc
                         else "transformers TrainingArguments gradient_checkpointing=False")
            self.default("optimizer", "adamw", "transformers TrainingArguments optim='adamw_torch_fused' (torch >= 2.8), "
                         "read as adamw")
        if self.kind == "trl":
            self.default("seq", 1024, "trl SFTConfig max_length=1024")
        if "seq" not in self.opts:
            self.defaults.append(("seq", 512, "the file gives no row length: loraplan's default; give --seq "
                                  "(or loraplan: {seq: N} in the file)"))

    def account_for_facts(self) -> None:
        """Every key read as a fact appears in the account (a fact whose key set nothing, e.g.
        ``load_in_8bit: false`` or ``packing: false``, is listed as used at its value)."""
        named = {k for k, _, _ in self.used} | {k for k, _ in self.ignored}
        for name, (value, key) in self.facts.items():
            if key not in named and key in self.keys_read:
                self.note(key, value, "read; it sets nothing here (the default)")
                named.add(key)

    def _checkpoint_dtype(self) -> str:
        """dtype 'auto': the checkpoint's ``torch_dtype`` from the catalog's config.json (bf16 when unknown)."""
        name = resolve_model_name(self.model_name) if self.model_name else None
        if name is None:
            return "bf16"
        try:
            from .catalog import load_model

            cfg = load_model(name).config
        except Exception:
            return "bf16"
        return _DTYPES.get(str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16").lower(), "bf16")


def resolve_model_name(name: str) -> str | None:
    """A catalog name for ``name`` (a catalog name, a Hugging Face id whose config.json the catalog
    holds, or an existing path), or None."""
    from .catalog import hub_model, model_entries

    key = name.strip().lower()
    if key in model_entries():
        return key
    p = Path(name).expanduser()
    if p.exists():  # a local folder wins, as from_pretrained's does (catalog.load_model)
        return str(p)
    return hub_model(key)


# ---- TRL / Transformers -----------------------------------------------------------------------


def _read_hf(r: _Reader, flat: dict, sections: dict) -> None:
    """TrainingArguments / SFTConfig / ModelConfig / ScriptArguments / LoraConfig / BitsAndBytesConfig keys,
    flat or in sections."""
    r.lora_section = "lora" in sections
    model_keys = set(flat) | set(sections.get("model", {}))
    if r.kind == "trl" and model_keys & {"lora_r", "lora_alpha", "lora_dropout", "lora_target_modules"} \
            and "use_peft" not in model_keys and "lora" not in sections:
        raise InputError(f"--config {r.path}: lora_* keys without use_peft: true; trl's ModelConfig defaults to "
                         f"use_peft false (full fine-tuning, not modelled): add use_peft: true")
    for k, v in flat.items():
        _hf_key(r, k, v, k)
    for sec, body in sections.items():
        name = body.get("__name__", sec)
        items = {k: v for k, v in body.items() if k != "__name__"}
        if sec == "loraplan":
            continue
        if sec == "script":
            for k in items:
                r.ignore(f"{name}.{k}", NO_EFFECT + " (dataset selection)")
            continue
        if sec == "prepare":
            _prepare(r, name, items)
            continue
        if sec == "get_peft_model":
            for k, v in items.items():
                if k == "autocast_adapter_dtype":
                    if r.boolean(f"{name}.{k}", v):
                        r.note(f"{name}.{k}", v, "adapters upcast to fp32 (peft's default)")
                    else:
                        r.note(f"{name}.{k}", v, "adapters stay in the base's dtype (see --adapter-dtype)")
                        r.fact("autocast_adapter_dtype", False, f"{name}.{k}")
                elif k in ("adapter_name", "mixed", "low_cpu_mem_usage", "revision"):
                    r.ignore(f"{name}.{k}")
                else:
                    raise r.unknown(f"{name}.{k}", ("autocast_adapter_dtype", "adapter_name"))
            continue
        if sec == "tokenizer":
            for k, v in items.items():
                _tokenizer_key(r, f"{name}.{k}", k, v)
            continue
        for k, v in items.items():
            _hf_key(r, k, v, f"{name}.{k}")
    # adapters left in the base's dtype: bf16/fp16 base -> that dtype (peft without _cast_adapter_dtype)
    if r.facts.get("autocast_adapter_dtype") and "adapter_dtype" not in r.opts:
        base = r.facts.get("dtype", (None,))[0] or "bf16"
        r.set("adapter_dtype", base, r.facts["autocast_adapter_dtype"][1], False,
              "peft get_peft_model(autocast_adapter_dtype=False) keeps the load dtype")


def _prepare(r: _Reader, name: str, items: dict) -> None:
    """``prepare_model_for_kbit_training``: true/false, or its kwargs (peft other.py)."""
    if "__value__" in items:
        r.set("prepare_kbit", bool(items["__value__"]), name, items["__value__"])
        return
    r.set("prepare_kbit", True, name, "{...}", "called")
    for k, v in items.items():
        key = f"{name}.{k}"
        if k == "use_gradient_checkpointing":
            r.set("gradient_checkpointing", r.boolean(key, v), key, v)
        elif k == "gradient_checkpointing_kwargs":
            _checkpoint_kwargs(r, key, v)
        else:
            raise r.unknown(key, ("use_gradient_checkpointing", "gradient_checkpointing_kwargs"))


def _tokenizer_key(r: _Reader, key: str, k: str, v: Any) -> None:
    if k in ("max_length", "model_max_length"):
        r.set("seq", r.integer(key, v), key, v, "rows truncated to this many tokens")
    elif k == "padding":
        s = str(v).lower()
        if s in ("max_length",):
            r.set("padding", "max-length", key, v)
        elif s in ("true", "longest"):
            r.note(key, v, "rows padded to the longest of each batch: the worst batch has rows of max_length "
                           "tokens (give loraplan: {padding: longest, lengths: [...]} for a length distribution)")
        elif s in ("false", "do_not_pad"):
            r.note(key, v, "no padding (batch 1 rows of their own length; the worst row has max_length tokens)")
        else:
            raise r.bad(key, v, "must be max_length, longest, true or false")
    elif k in ("truncation", "padding_side", "pad_token", "add_special_tokens", "return_tensors", "use_fast"):
        r.ignore(key)
    else:
        raise r.unknown(key, ("max_length", "padding", "truncation"))


def _checkpoint_kwargs(r: _Reader, key: str, v: Any) -> None:
    """``gradient_checkpointing_kwargs`` (transformers modeling_utils.py::gradient_checkpointing_enable;
    every_n_layers/offload from transformers 5; other keys go to torch.utils.checkpoint)."""
    if v is None:
        r.ignore(key, "None: the trainer's default use_reentrant")
        return
    if isinstance(v, str) and v.strip().startswith("{"):
        v = json.loads(v)
    if not isinstance(v, dict):
        raise r.bad(key, v, "must be a mapping such as {use_reentrant: false}")
    for k, x in v.items():
        kk = f"{key}.{k}"
        if k == "use_reentrant":
            r.set("reentrant", r.boolean(kk, x), kk, x)
        elif k == "every_n_layers":
            r.set("checkpoint_every_n_layers", r.integer(kk, x), kk, x)
        elif k == "offload":
            r.set("checkpoint_offload", r.boolean(kk, x), kk, x)
        elif k in ("preserve_rng_state", "determinism_check", "debug"):
            r.ignore(kk)
        else:
            raise r.unknown(kk, ("use_reentrant", "every_n_layers", "offload", "preserve_rng_state"))


def _hf_key(r: _Reader, k: str, v: Any, key: str) -> None:  # noqa: C901 - one branch per key, flat on purpose
    """One TrainingArguments / SFTConfig / ModelConfig / LoraConfig / BitsAndBytesConfig / from_pretrained key."""
    if k in IRRELEVANT:
        r.ignore(key)
    elif k in _ONLY_WITH:
        r.ignore(key, _ONLY_WITH[k])
    elif k in _UNMODELLED:
        _unmodelled_nested(r, key, k, v)
    elif k in ("bf16", "fp16"):
        r.fact(k, r.boolean(key, v), key)
    elif k == "tf32":
        r.ignore(key, "TF32 changes fp32 matmul speed only; loraplan's time model does not read it")
    elif k == "per_device_train_batch_size":
        r.set("batch", r.integer(key, v), key, v)
    elif k == "auto_find_batch_size":
        if r.boolean(key, v):
            r.note(key, v, "starts at per_device_train_batch_size and halves it on OOM; loraplan estimates the "
                           "starting batch ('loraplan plan' finds the largest that fits)")
        else:
            r.ignore(key, "off (the default); " + NO_EFFECT)
    elif k == "gradient_accumulation_steps":
        r.set("gradient_accumulation", r.integer(key, v), key, v)
    elif k in ("gradient_checkpointing", "activation_checkpointing"):
        if v is None:
            r.ignore(key, "None: the config's default")
        else:
            r.set("gradient_checkpointing", r.boolean(key, v), key, v)
    elif k in ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"):
        _checkpoint_kwargs(r, key, v)
    elif k == "max_grad_norm":
        r.set("max_grad_norm", r.number(key, v) if v is not None else 0.0, key, v, "0: no clipping" if not v else "")
    elif k == "optim":
        r.optim(key, v)
    elif k in ("max_length", "max_seq_length"):
        if v is None:
            raise r.bad(key, v, "(no truncation) leaves the row length to the data; give loraplan: {seq: N} "
                                "or --seq with your longest row")
        r.set("seq", r.integer(key, v), key, v, "trl < 0.20 name of max_length" if k == "max_seq_length" else "")
    elif k == "packing":
        r.fact("packing", r.boolean(key, v), key)
        _padding(r)
    elif k == "packing_strategy":
        if v not in ("bfd", "bfd_split", "wrapped"):
            raise r.bad(key, v, "must be bfd, bfd_split or wrapped")
        r.fact("packing_strategy", v, key)
        _padding(r)
    elif k == "padding_free":
        r.fact("padding_free", r.boolean(key, v), key)
        _padding(r)
    elif k == "use_liger_kernel":
        if r.boolean(key, v):
            r.set("loss", "liger", key, v, "Liger's fused linear cross-entropy")
        else:
            r.ignore(key, "off (the default); " + NO_EFFECT)
    elif k == "liger_kernel_config":
        if isinstance(v, dict) and v.get("fused_linear_cross_entropy") is False:
            r.opts.pop("loss", None)
            r.note(key, v, "no fused linear cross-entropy: the standard loss path")
        else:
            r.ignore(key, "Liger kernel options other than fused_linear_cross_entropy do not change the ledger")
    elif k == "loss_type":
        if v in ("nll", "chunked_nll"):
            r.note(key, v, "the standard loss (trl 1.16: 'chunked_nll' is an alias of 'nll')")
        else:
            raise r.bad(key, v, "is not modelled; use loss_type: nll")
    elif k == "router_aux_loss_coef":
        r.ignore(key, "scales the MoE auxiliary loss; " + NO_EFFECT)
    # ---- ModelConfig / from_pretrained
    elif k in ("model_name_or_path", "pretrained_model_name_or_path", "base_model_name_or_path", "model"):
        if v is None:
            r.ignore(key, "None")
        else:
            r.model(key, v)
    elif k in ("dtype", "torch_dtype"):
        d = r.dtype(key, v, allow_auto=True)
        if d is None:
            r.fact("dtype_auto", True, key)
            r.note(key, v, "the checkpoint's dtype")
        else:
            r.fact("dtype", d, key, raw=v)
    elif k == "attn_implementation":
        if v is None:
            r.ignore(key, "None: transformers' default (sdpa)")
        elif v in ("sdpa", "eager", "flash_attention_2"):
            r.set("attn_implementation", v, key, v)
        else:
            raise r.bad(key, v, "is not modelled; use sdpa, eager or flash_attention_2")
    elif k == "use_peft":
        if not r.boolean(key, v):
            raise r.bad(key, v, "means full fine-tuning, which loraplan does not model; set use_peft: true")
        r.note(key, v, "LoRA (trl get_peft_config)")
    elif k in ("lora_r", "r"):
        r.set("rank", r.integer(key, v), key, v)
    elif k == "lora_alpha":
        r.set("alpha", r.number(key, v), key, v)
    elif k == "lora_dropout":
        r.set("dropout", r.number(key, v), key, v)
    elif k in ("lora_target_modules", "target_modules"):
        r.targets(key, v)
    elif k in ("lora_target_parameters", "target_parameters"):
        if v:
            r.targets(key, v)
        else:
            r.ignore(key, "None: no parameter targets")
    elif k in ("use_rslora",):
        r.ignore(key, "rsLoRA changes the scale alpha/sqrt(r) only; " + NO_EFFECT)
    elif k == "bias":
        if v != "none":
            raise r.bad(key, v, "trains bias vectors, which loraplan does not model; use bias: none")
        r.ignore(key, "'none': no trainable biases")
    elif k == "peft_type":
        if v is not None and str(v).upper() != "LORA":
            raise r.bad(key, v, "is not LoRA; loraplan models LoRA/QLoRA only")
        r.ignore(key, "LORA")
    # ---- BitsAndBytesConfig (and the same names in ModelConfig)
    elif k == "load_in_4bit":
        r.fact("load_in_4bit", r.boolean(key, v), key)
    elif k == "load_in_8bit":
        r.fact("load_in_8bit", r.boolean(key, v), key)
    elif k == "bnb_4bit_quant_type":
        if v not in ("nf4", "fp4"):
            raise r.bad(key, v, "must be nf4 or fp4")
        r.fact("quant_type", v, key)
    elif k in ("bnb_4bit_use_double_quant", "use_bnb_nested_quant"):
        r.fact("double_quant", r.boolean(key, v), key)
    elif k == "bnb_4bit_compute_dtype":
        r.fact("compute_dtype", r.dtype(key, v), key, raw=v)
    elif k == "llm_int8_threshold":
        if r.number(key, v) != 6.0:
            raise r.bad(key, v, "is not modelled (loraplan's int8 outlier model assumes 6.0); use 6.0")
        r.ignore(key, "6.0, the default")
    elif k in ("quantization_config",) and isinstance(v, dict):
        for kk, vv in v.items():
            _hf_key(r, kk, vv, f"{key}.{kk}")
    elif k in ("model_init_kwargs",):
        if v is None:
            r.ignore(key, "None")
        elif isinstance(v, dict):
            for kk, vv in v.items():
                _hf_key(r, kk, vv, f"{key}.{kk}")
        else:
            raise r.bad(key, v, "must be a mapping of from_pretrained arguments")
    else:
        raise r.unknown(key, _HF_VOCAB)


def _unmodelled_nested(r: _Reader, key: str, k: str, v: Any) -> None:
    if v in (None, False, "", [], {}, 0) or v in _OFF_VALUES.get(k, ()):
        r.ignore(key, "off (the default); " + NO_EFFECT)
    else:
        raise InputError(f"--config {r.path}: {key} {_short(v)}: {_UNMODELLED[k]}")


def _padding(r: _Reader) -> None:
    """trl 1.16 SFTConfig: ``packing`` fills rows of max_length; with ``packing_strategy`` bfd (the default)
    it also turns on ``padding_free`` (trl trainer/sft_config.py; sft_trainer.py), which flattens the batch
    into one row with position_ids; ``padding_free`` alone flattens unpacked rows."""
    f = {k: v[0] for k, v in r.facts.items()}
    packing, strategy, free = f.get("packing", False), f.get("packing_strategy", "bfd"), f.get("padding_free", False)
    r.opts.pop("padding", None)
    if packing and strategy in ("bfd", "bfd_split"):
        r.opts["padding"] = "padding-free"
        if "lengths" not in r.opts:
            # bfd bins documents into rows of up to max_length tokens: the worst batch is every row full
            # (trl data_utils.py::pack_dataset); a loraplan: section's lengths replace it
            r.opts["lengths"] = (int(r.opts.get("seq") or 1024),)
    elif packing:
        r.opts["padding"] = "packing"
    elif free:
        r.opts["padding"] = "padding-free"
    r.used = [u for u in r.used if not u[2].startswith("--padding ")]
    if "padding" in r.opts:
        keys = [r.facts[x][1] for x in ("packing", "packing_strategy", "padding_free") if x in r.facts]
        r.used.append((" + ".join(keys), {x: f[x] for x in ("packing", "packing_strategy", "padding_free") if x in f},
                       f"--padding {r.opts['padding']}"
                       + (" (bfd packing turns on padding_free: one flattened row per batch of bins filled to "
                          "max_length, --lengths max_length)"
                          if packing and strategy != "wrapped" else "")))


_HF_VOCAB = tuple(sorted(IRRELEVANT | set(_UNMODELLED) | set(_ONLY_WITH) | {
    "bf16", "fp16", "tf32", "per_device_train_batch_size", "auto_find_batch_size", "gradient_accumulation_steps",
    "gradient_checkpointing", "activation_checkpointing", "gradient_checkpointing_kwargs",
    "activation_checkpointing_kwargs", "max_grad_norm", "optim", "max_length", "max_seq_length", "packing",
    "packing_strategy", "padding_free", "use_liger_kernel", "liger_kernel_config", "loss_type",
    "model_name_or_path", "dtype", "torch_dtype", "attn_implementation", "use_peft", "lora_r", "r", "lora_alpha",
    "lora_dropout", "lora_target_modules", "target_modules", "target_parameters", "use_rslora", "bias", "load_in_4bit",
    "load_in_8bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "use_bnb_nested_quant",
    "bnb_4bit_compute_dtype", "llm_int8_threshold", "quantization_config", "model_init_kwargs"}))


# ---- axolotl ----------------------------------------------------------------------------------


def _read_axolotl(r: _Reader, flat: dict) -> None:  # noqa: C901
    """An axolotl YAML (axolotl utils/schemas/config.py names). Checked against axolotl's docs/config.qmd:
    ``adapter: qlora`` loads nf4 with double quantization and ``bnb_4bit_compute_dtype`` = the run's dtype;
    ``bf16``/``fp16`` are TrainingArguments' (autocast) and also the load dtype (``torch_dtype``);
    ``gradient_checkpointing_kwargs`` defaults to ``{use_reentrant: False}`` (core/trainer_builder.py);
    axolotl calls ``prepare_model_for_kbit_training`` for 8-bit LoRA and 4-bit QLoRA
    (loaders/model.py::ModelLoader._prepare_model_for_quantization)."""
    adapter = flat.get("adapter")
    if adapter not in ("lora", "qlora"):
        raise r.bad("adapter", adapter, "must be lora or qlora (loraplan models LoRA/QLoRA; full fine-tuning is not modelled)")
    for k, v in flat.items():
        if k == "adapter":
            r.note(k, v, "LoRA" + (" on a 4-bit base (with load_in_4bit)" if v == "qlora" else ""))
        elif k in ("base_model",):
            r.model(k, v)
        elif k == "load_in_4bit":
            if r.boolean(k, v):
                r.fact("load_in_4bit", True, k)
            else:
                r.ignore(k, "false")
        elif k == "load_in_8bit":
            if r.boolean(k, v):
                r.fact("load_in_8bit", True, k)
            else:
                r.ignore(k, "false")
        elif k == "bf16":
            b = v if v == "auto" else r.boolean(k, v)
            if b == "auto":
                r.note(k, v, "auto: bf16 where the GPU supports it (read as true)")
                b = True
            r.fact("bf16", b, k)
            if b:
                r.fact("dtype", "bf16", k)
        elif k == "fp16":
            b = r.boolean(k, v) if v is not None else False
            r.fact("fp16", b, k)
            if b and "dtype" not in r.facts:
                r.fact("dtype", "fp16", k)
        elif k == "tf32":
            r.ignore(k, "TF32 changes fp32 matmul speed only; loraplan's time model does not read it")
        elif k == "lora_r":
            r.set("rank", r.integer(k, v), k, v)
        elif k == "lora_alpha":
            r.set("alpha", r.number(k, v), k, v)
        elif k == "lora_dropout":
            r.set("dropout", r.number(k, v) if v is not None else 0.0, k, v)
        elif k == "lora_target_modules":
            if v:
                r.targets(k, v)
            else:
                r.ignore(k, "empty")
        elif k == "lora_target_linear":
            if r.boolean(k, v):
                r.set("targets", "all-linear", k, v, "every Linear but the output layer")
            else:
                r.ignore(k, "false")
        elif k == "sequence_len":
            r.set("seq", r.integer(k, v), k, v)
        elif k == "sample_packing":
            if r.boolean(k, v):
                r.set("padding", "packing", k, v, "multipack: samples packed into rows of sequence_len")
            else:
                r.ignore(k, "false: each row is one sample")
        elif k == "pad_to_sequence_len":
            if r.boolean(k, v) and "padding" not in r.opts:
                r.set("padding", "max-length", k, v)
            else:
                r.ignore(k, "rows padded to the batch's longest: the worst batch has rows of sequence_len tokens"
                          if not v else "with sample_packing the packed rows are sequence_len long")
        elif k == "micro_batch_size":
            r.set("batch", r.integer(k, v), k, v)
        elif k == "gradient_accumulation_steps":
            r.set("gradient_accumulation", r.integer(k, v), k, v)
        elif k == "gradient_checkpointing":
            if v in ("unsloth", "offload"):
                r.set("gradient_checkpointing", True, k, v, "with offload of checkpointed inputs")
                r.set("checkpoint_offload", True, k, v)
            else:
                r.set("gradient_checkpointing", bool(v) and r.boolean(k, v), k, v)
        elif k == "gradient_checkpointing_kwargs":
            _checkpoint_kwargs(r, k, v)
        elif k == "max_grad_norm":
            r.set("max_grad_norm", r.number(k, v) if v is not None else 1.0, k, v)
        elif k == "optimizer":
            r.optim(k, v)
        elif k == "flash_attention":
            if v:
                r.set("attn_implementation", "flash_attention_2", k, v)
            else:
                r.ignore(k, "false")
        elif k == "sdp_attention":
            if v:
                r.set("attn_implementation", "sdpa", k, v)
            else:
                r.ignore(k, "false")
        elif k == "eager_attention":
            if v:
                r.set("attn_implementation", "eager", k, v)
            else:
                r.ignore(k, "false")
        elif k == "plugins":
            names = list(v or [])
            for p in names:
                if "liger" in str(p).lower():
                    r.note(k, p, "Liger plugin (see liger_fused_linear_cross_entropy)")
                else:
                    raise r.bad(k, p, "is a plugin loraplan does not model; remove it")
            if not names:
                r.ignore(k, "empty")
        elif k == "liger_fused_linear_cross_entropy":
            if r.boolean(k, v):
                r.set("loss", "liger", k, v)
            else:
                r.ignore(k, "false")
        elif k in ("liger_rope", "liger_rms_norm", "liger_glu_activation", "liger_layer_norm", "liger_cross_entropy"):
            r.ignore(k, "Liger kernels other than the fused linear cross-entropy are not in the ledger "
                        "(they change activation bytes slightly)")
        elif k == "chunked_cross_entropy":
            if r.boolean(k, v):
                # axolotl's chunked CE keeps every logits chunk alive for backward (only the fp32
                # upcast is per chunk): not trl's fused head (--loss chunked); the standard loss's
                # full fp32 copy is the conservative stand-in
                r.note(k, v, "read as --loss standard: the logits chunks all stay alive; only the fp32 upcast "
                             "is per chunk, so the standard loss (full fp32 copy) over-counts, never under-counts")
            else:
                r.ignore(k, "false")
        elif k == "bnb_config_kwargs":
            for kk, vv in (v or {}).items():
                _hf_key(r, kk, vv, f"{k}.{kk}")
        elif k in IRRELEVANT:
            r.ignore(k)
        elif k in _ONLY_WITH:
            r.ignore(k, _ONLY_WITH[k])
        elif k in _UNMODELLED:
            r.unmodelled(k, v)
        else:
            raise r.unknown(k, _AXOLOTL_VOCAB)
    f = r.facts
    if adapter == "qlora" and "load_in_4bit" not in f:
        raise InputError(f"--config {r.path}: adapter qlora without load_in_4bit: true; axolotl quantizes only with "
                         f"both (utils/schemas validation): add load_in_4bit: true")
    if "load_in_4bit" in f and adapter == "lora":
        raise InputError(f"--config {r.path}: load_in_4bit with adapter: lora; axolotl wants adapter: qlora for a 4-bit base")
    if "load_in_4bit" in f:  # axolotl loaders/model.py: qlora's BitsAndBytesConfig (nf4, double quant, torch_dtype)
        r.fact("quant_type", "nf4", "adapter", raw=adapter)
        r.fact("double_quant", True, "adapter")
        r.fact("compute_dtype", f.get("dtype", ("fp32",))[0], "adapter")
    if "load_in_4bit" in f or "load_in_8bit" in f:
        r.default("prepare_kbit", True, "axolotl loaders/model.py::ModelLoader._prepare_model_for_quantization: "
                                        "prepare_model_for_kbit_training for load_in_8bit/load_in_4bit adapters")
    if "dtype" not in f:  # axolotl: torch_dtype float32 when neither bf16 nor fp16 is set
        r.fact("dtype", "fp32", "bf16/fp16 (unset: float32)")
    r.default("reentrant", False, "axolotl trainer builder: gradient_checkpointing_kwargs={'use_reentrant': False}")
    r.default("gradient_checkpointing", False, "axolotl: gradient_checkpointing unset is off")
    r.default("optimizer", "adamw", "axolotl's default optimizer (adamw_torch_fused), read as adamw")
    r.default("batch", 1, "axolotl micro_batch_size=1")


_AXOLOTL_VOCAB = tuple(sorted(IRRELEVANT | set(_UNMODELLED) | set(_ONLY_WITH) | {
    "adapter", "base_model", "load_in_4bit", "load_in_8bit", "bf16", "fp16", "tf32", "lora_r", "lora_alpha",
    "lora_dropout", "lora_target_modules", "lora_target_linear", "sequence_len", "sample_packing",
    "pad_to_sequence_len", "micro_batch_size", "gradient_accumulation_steps", "gradient_checkpointing",
    "gradient_checkpointing_kwargs", "max_grad_norm", "optimizer", "flash_attention", "sdp_attention",
    "eager_attention", "plugins", "liger_fused_linear_cross_entropy", "chunked_cross_entropy", "bnb_config_kwargs"}))


# ---- applying a recipe to a command's options -------------------------------------------------


def apply_recipe(recipe: Recipe, opts: dict, given: set[str], multi: bool = False) -> tuple[dict, tuple[str, ...],
                                                                                          tuple[str, ...]]:
    """``opts`` (a command's case options) with the recipe's values where the command line gave none.

    ``given``: the option names the user typed (they override the file). ``multi``: the grid
    commands' raw form (strings; targets a tuple of comma strings). Returns the new options, the
    names the command line overrode, and the recipe's options this command has no place for
    (``gpu`` for plan and profile, which take their own GPU lists).
    """
    out = dict(opts)
    overridden, unused = [], []
    for k, v in recipe.options.items():
        if k not in out:
            if v is not None:
                unused.append(k)
            continue
        if k in given:
            if v is not None:
                overridden.append(k)
            continue
        if v is None:
            continue
        if multi:
            if k == "targets":
                v = (v if isinstance(v, str) else ",".join(v),)
            elif k == "lengths":
                v = ",".join(map(str, v)) if isinstance(v, (tuple, list)) else v
            elif not isinstance(v, bool):
                v = str(v)
        out[k] = v
    return out, tuple(overridden), tuple(unused)
