"""Real LoRA/QLoRA training bursts (``loraplan profile``), following loraplan/data/h100-protocol.md.

Public API (only ``burst``/``worker``/``probes`` import torch, and only in the
worker process):

- ``runner.build_cases(case_dicts, gpu=None) -> list[Case]``: grid dicts (case option names)
  -> validated cases; ``runner.detect_device("cuda"|"cpu") -> DeviceInfo`` (gpu id from the
  catalog, asked of a worker so the parent never opens a CUDA context);
  ``runner.profile(cases, dev, out=, force=, steps=, warmup=, timeout=, cache_dir=, on_event=)
  -> list[CaseResult]``: one worker process per case, one record appended per case;
  ``runner.run_worker(spec, timeout)``, ``runner.make_record(...)``, ``runner.check_extras``.
- ``records``: ``append_record`` (one os.write to an O_APPEND fd + fsync; a write that fails part
  way is truncated back), ``check_writable``, ``keep_record``/``merge_recovered`` (a record that
  cannot be written goes to a recovery file the next run adds back), ``read_records`` (corrupt
  lines reported by number, never rewritten), ``case_key``, ``gpu_id_for_name``.
- ``locks``: ``records_lock`` / ``device_lock`` (one run per records file and per GPU, flock),
  ``remove_stale_temp_dirs`` (temp folders of killed runs).
- ``burst.run_burst(spec, emit) -> dict``: one case in this process (status ok|oom|error).
- ``distributed``: a multi-GPU case (``--strategy ddp|fsdp|fsdp-offload --num-gpus N``) as a
  torchrun job (``runner.run_distributed``): each rank runs ``run_burst`` with the model wrapped
  by DDP / FSDP2 / FSDP1 (``distributed.wrap_model``); ``runner.make_distributed_records`` makes
  one record per rank plus a summary (``records.RANK`` / ``records.SUMMARY``), appended together.
- ``probes``: ``CudaProbe`` (torch.cuda.memory_stats peaks), ``NvmlSampler`` (2 ms thread),
  ``CpuProbe`` (live-tensor tracker); ``grid.load_grid_file`` for ``--grid``.
"""
