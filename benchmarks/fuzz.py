"""A black-box fuzzer of the ``loraplan`` command line: tracebacks, hangs and wrong successes.

    python benchmarks/fuzz.py [--n 10000] [--seed 0] [--timeout 10] [--show 5]

Each case is a random ``estimate`` / ``plan`` / ``sweep`` invocation that mixes valid and
invalid values: mutated ``config.json`` files (NaN, ±Infinity, strings, booleans, lists, 0,
negatives, huge numbers, heads that do not divide, missing keys), adversarial files (UTF-16,
deep nesting, empty, binary, a directory, a FIFO, /dev/zero), calibration and grid files with
bad values, and bad option values (NaN, inf, ranges with bad steps, empty strings, 5,000
characters). Every case says whether its input is valid, invalid, or "either" (a value
loraplan does not read). The verdict of one case:

- ``traceback``: an exception escaped ``loraplan.cli.main`` (anything but a clean exit);
- ``hang``: it ran past ``--timeout`` seconds (SIGALRM) — also what a memory blow-up looks like
  under the address-space limit this process sets on itself (``MemoryError``: a traceback);
- ``wrong_success``: exit 0 for an invalid input, or exit 0 with output that holds a negative,
  NaN or infinite figure (``headroom_bytes`` may be negative);
- ``wrong_refusal``: exit 2 for an input marked valid;
- ``ok`` otherwise. Exit 2 must print one ``error: ...`` line.

The run is deterministic for a seed. ``tests/test_fuzz.py`` runs a few hundred cases in CI.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import math
import os
import random
import resource
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

#: catalog models whose config.json values the mutations start from (one per family)
BASES = ("llama-3.2-1b", "qwen2.5-0.5b", "qwen3-0.6b", "mistral-7b", "gemma-2-2b", "phi-3-mini-4k",
         "pythia-1b", "opt-6.7b", "falcon-7b", "flan-t5-base", "mt0-large")

#: config.json keys that are positive integer dimensions wherever they appear
DIMENSIONS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
              "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "num_decoder_layers", "ffn_dim",
              "word_embed_proj_dim", "n_head", "n_layer")
#: keys that may be null (the family default applies) or a positive integer
OPTIONAL_DIMENSIONS = ("num_key_value_heads", "head_dim", "sliding_window", "num_kv_heads",
                       "max_position_embeddings")

BAD_JSON_VALUES = ("0", "-1", "-4096", "NaN", "Infinity", "-Infinity", '"64"', "true", "false", "[]", "{}",
                   "1e999999", "1e12", "3.5", "9223372036854775808", '"x"')


@dataclass
class Case:
    argv: list[str]
    expect: str  # valid | invalid | either
    what: str
    files: dict[str, bytes] = field(default_factory=dict)  # name -> content, made in a temp folder
    special: str = ""  # fifo | devzero


def _catalog_config(name: str) -> dict:
    from loraplan.catalog import model_entries

    return dict(model_entries()[name]["config"])


def _json_bytes(cfg: dict, key: str, raw: str) -> bytes:
    """``cfg`` as JSON with ``key`` set to the raw JSON text ``raw`` (which may be NaN, 1e999999)."""
    marker = "__FUZZ_VALUE__"
    text = json.dumps({**cfg, key: marker})
    return text.replace(json.dumps(marker), raw).encode()


def _dimension_valid(key: str, raw: str, cfg: dict) -> str:
    try:
        v = json.loads(raw)
    except ValueError:
        return "invalid"
    if key in OPTIONAL_DIMENSIONS and v is None:
        # OPT's learned position table is [max_position_embeddings + 2, h]: transformers cannot build
        # it from null (OPTLearnedPositionalEmbedding adds its offset of 2 to the size)
        return "invalid" if (key == "max_position_embeddings" and cfg.get("model_type") == "opt") else "valid"
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v > 10_000_000:
        return "invalid"
    heads = cfg.get("num_attention_heads") or cfg.get("num_heads")
    if key in ("num_key_value_heads", "num_kv_heads") and heads and heads % v:
        return "invalid"
    if key in ("num_hidden_layers", "num_layers", "num_decoder_layers", "n_layer") and v > 1000:
        return "invalid"
    if key in ("num_attention_heads", "num_heads", "n_head"):
        return "either"  # may or may not divide hidden_size / kv heads: the library decides
    if key in ("hidden_size", "d_model") and v < 64:
        return "either"
    return "either" if v != cfg.get(key) else "valid"


def gen_config_mutation(rng: random.Random) -> Case:
    base = rng.choice(BASES)
    cfg = _catalog_config(base)
    keys = [k for k in DIMENSIONS + OPTIONAL_DIMENSIONS if k in cfg] or ["hidden_size"]
    key = rng.choice(keys + ["num_key_value_heads"])
    raw = rng.choice(BAD_JSON_VALUES + ("null", "3", "7", "1"))
    expect = _dimension_valid(key, raw, cfg) if key in cfg or key in OPTIONAL_DIMENSIONS else "either"
    cmd = rng.choice(("estimate", "estimate", "plan", "sweep"))
    return Case(_job_size(_argv(cmd, rng, model="{dir}/config.json", quant=rng.choice(("nf4", "bf16", "int8")))),
                expect, f"config {base}: {key}={raw}", files={"config.json": _json_bytes(cfg, key, raw)})


def gen_config_removal(rng: random.Random) -> Case:
    base = rng.choice(BASES)
    cfg = _catalog_config(base)
    key = rng.choice(sorted(cfg))
    cfg.pop(key)
    expect = "invalid" if key in ("model_type",) else "either"
    return Case(_argv("estimate", rng, model="{dir}/config.json"), expect, f"config {base}: without {key}",
                files={"config.json": json.dumps(cfg).encode()})


def gen_bad_file(rng: random.Random) -> Case:
    cfg = _catalog_config(rng.choice(BASES))
    text = json.dumps(cfg)
    kind = rng.choice(("utf16", "bom", "nested", "empty", "binary", "array", "dir", "fifo", "devzero",
                       "missing", "trailing", "huge_number"))
    files, model, expect, special = {}, "{dir}/config.json", "invalid", ""
    if kind == "utf16":
        files["config.json"] = text.encode("utf-16")
    elif kind == "bom":
        files["config.json"] = b"\xef\xbb\xbf" + text.encode()
        expect = "valid"
    elif kind == "nested":
        files["config.json"] = (b"[" * 100_000) + (b"]" * 100_000)
    elif kind == "empty":
        files["config.json"] = b""
    elif kind == "binary":
        files["config.json"] = bytes(rng.randrange(256) for _ in range(2048))
    elif kind == "array":
        files["config.json"] = b"[1, 2, 3]"
    elif kind == "dir":
        files["sub/readme.txt"] = b"no config here"
        model = "{dir}/sub"
    elif kind == "fifo":
        special = "fifo"
    elif kind == "devzero":
        model, special = "/dev/zero", "devzero"
    elif kind == "missing":
        model = "{dir}/nope/config.json"
    elif kind == "trailing":
        files["config.json"] = text.encode() + b" garbage"
    else:
        files["config.json"] = _json_bytes(cfg, "vocab_size", "1" + "0" * 400)
    return Case(_job_size(_argv(rng.choice(("estimate", "plan")), rng, model=model)), expect, f"file: {kind}", files,
                special)


#: option -> (bad values, good values)
OPTION_VALUES = {
    "--rank": (("0", "-8", "x", "nan", "inf", "1e9", "8.5", "", "8:64:x", "8:64:x0", "64:8:x2", "8:64:+nan",
                "8:64:xinf"), ("8", "16", "8,16", "8:64:x2", "4:12:+4")),
    "--alpha": (("nan", "inf", "-inf", "x", ""), ("16", "32.5")),
    "--dropout": (("1", "-0.1", "nan", "inf", "x", "1.5"), ("0", "0.1")),
    "--batch": (("0", "-1", "1e12", "x", "2.5", "nan", "1:8:+0.5", "1:8:xnan"), ("1", "4", "1:4:+1")),
    "--seq": (("0", "-512", "x", "nan", "1e15", "512:8192:x1", "512:8192:x1.0000001"), ("256", "1024", "512:2048:x2")),
    "--target-seq": (("0", "-1", "x", "nan"), ("128",)),
    "--targets": (("", "*", "nonexistent_proj", ",", "q_proj,,", "all-linear,*"), ("all-linear", "all-linear,lm_head")),
    "--optimizer": (("adam", "", "x", "sgd2"), ("sgd", "paged_adamw_8bit", "adamw-8bit")),
    "--quant": (("int4", "", "q3", "nf8"), ("bf16", "fp4", "int8")),
    "--attention": (("flash3", "", "x"), ("eager", "math")),
    "--int8-outlier-fraction": (("-0.1", "1.5", "nan", "inf", "x"), ("0", "0.05")),
    "--gpu": (("", "h100", "x" * 300, ","), ("a10g-24gb", "rtx4090-24gb")),
    "--model": (("x" * 5000, "", "llama-7b", "../../etc/passwd", "nope.json"), ("llama-2-7b", "qwen2.5-0.5b")),
}
PLAN_VALUES = {
    "--tokens": (("nan", "inf", "-1", "0", "x", "1e400"), ("1e6", "5000000")),
    "--epochs": (("nan", "inf", "-1", "0", "x"), ("1", "2.5")),
    "--examples": (("nan", "-5", "0", "inf"), ("1000",)),
    "--effective-batch": (("0", "-4", "x"), ("16",)),
    "--price": (("a10g-24gb=nan", "a10g-24gb=-1", "a10g-24gb=x", "nope=1", "=1", "a10g-24gb"), ("a10g-24gb=1.5",)),
}
#: options whose ranges the single-valued commands (estimate, plan) reject
_RANGE_ONLY = ("8,16", "8:64:x2", "4:12:+4", "1:4:+1", "512:2048:x2")


def _argv(cmd: str, rng: random.Random, **opts) -> list[str]:
    argv = [cmd]
    for k, v in opts.items():
        argv += [f"--{k.replace('_', '-')}", v]
    if cmd in ("estimate", "plan"):
        argv += ["--format", "json"]
    if cmd == "sweep":
        argv += ["--out", "{dir}/out.jsonl", "--yes"]
    return argv


def _job_size(argv: list[str]) -> list[str]:
    """plan needs a job size: --tokens unless the case gives one."""
    if argv[0] == "plan" and not any(a in argv for a in ("--tokens", "--examples")):
        argv += ["--tokens", "1e6"]
    return argv


def gen_option(rng: random.Random) -> Case:
    cmd = rng.choice(("estimate", "plan", "sweep"))
    table = dict(OPTION_VALUES, **(PLAN_VALUES if cmd == "plan" else {}))
    opt = rng.choice(sorted(table))
    bad, good = table[opt]
    valid = rng.random() < 0.3
    value = rng.choice(good if valid else bad)
    expect = "valid" if valid else "invalid"
    if cmd != "sweep" and value in _RANGE_ONLY or (cmd == "plan" and opt == "--gpu" and value == ","):
        expect = "invalid"
    if opt == "--target-seq":  # decoder-only models ignore it
        expect = "either"
    if opt == "--model" and value in ("llama-2-7b", "qwen2.5-0.5b"):
        expect = "valid"
    base = {"model": rng.choice(("llama-2-7b", "qwen2.5-0.5b", "flan-t5-base"))}
    if opt == "--int8-outlier-fraction" and valid:
        base["quant"] = "int8"
    if opt == "--targets" and valid and base["model"] == "flan-t5-base" and "lm_head" in value:
        expect = "either"
    argv = _argv(cmd, rng, **base)
    if opt == "--model":
        argv[argv.index("--model") + 1] = value
    else:
        argv += [opt, value]
    if opt == "--gpu" and cmd == "estimate" and value == ",":
        expect = "invalid"
    return Case(_job_size(argv), expect, f"{cmd} {opt} {value[:40]!r}")


def gen_calibration(rng: random.Random) -> Case:
    key = rng.choice(("reserved_over_allocated_ratio", "cuda_context_bytes", "time_eff_mm", "time_host_op_s",
                      "cublas_handles", "allocator_overhead_bytes", "time_eff_bw"))
    raw = rng.choice(("-0.5", "NaN", "Infinity", '"x"', "-1e12", "true", "0", "[]", "1e300"))
    body = '{"gpu": "h100-sxm-80gb", "coefficients": {"%s": %s}, "provenance": {}}' % (key, raw)
    expect = "invalid"
    # 0 is a possible value of these (and what 'loraplan calibrate' writes when a fit clips an
    # overhead or a host cost at zero); cublas_handles needs >= 1, efficiencies are > 0
    if raw == "0" and key in ("allocator_overhead_bytes", "cuda_context_bytes", "reserved_over_allocated_ratio",
                              "time_host_op_s"):
        expect = "valid"
    return Case(["estimate", "--calibration", "{dir}/cal.json", "--format", "json"], expect,
                f"calibration {key}={raw}", files={"cal.json": body.encode()})


def gen_grid(rng: random.Random) -> Case:
    key = rng.choice(("rank", "seq", "batch", "quant", "targets", "nonsense", "gpu", "dropout"))
    raw = rng.choice(("[]", "[0]", "[-1]", '"8:64:x0"', "[null]", '[{"a": 1}]', "NaN", '"x"', "[8, 16]"))
    body = '{"model": "qwen2.5-0.5b", "%s": %s}' % (key, raw)
    expect = "valid" if (raw == "[8, 16]" and key in ("rank", "seq", "batch")) else "invalid"
    if key == "dropout" and raw == "[0]":
        expect = "valid"
    return Case(["sweep", "--grid", "{dir}/grid.json", "--out", "{dir}/out.jsonl", "--yes"], expect,
                f"grid {key}={raw}", files={"grid.json": body.encode()})


def gen_sweep_out(rng: random.Random) -> Case:
    out = rng.choice(("{dir}/missing/out.csv", "{dir}/out.xyz", "{dir}", "/proc/forbidden.csv"))
    return Case(["sweep", "--model", "qwen2.5-0.5b", "--out", out, "--yes"], "invalid", f"sweep --out {out}")


GENERATORS = ((gen_config_mutation, 40), (gen_config_removal, 8), (gen_bad_file, 10), (gen_option, 30),
              (gen_calibration, 5), (gen_grid, 5), (gen_sweep_out, 2))


def make_cases(n: int, seed: int) -> list[Case]:
    rng = random.Random(seed)
    gens, weights = zip(*GENERATORS)
    return [rng.choices(gens, weights)[0](rng) for _ in range(n)]


# ------------------------------------------------------------------------------------------------
# Running and judging
# ------------------------------------------------------------------------------------------------


class _Timeout(BaseException):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def _numbers(obj, path=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield path, obj


#: figures that may legitimately be negative
_SIGNED = ("headroom_bytes", "trace_vs_analytic_percent", "margin")


def insane_output(text: str) -> str | None:
    """The first NaN, infinite or negative figure in JSON / JSON-lines output, else None."""
    docs = []
    for chunk in [text] if text.lstrip().startswith(("{", "[")) else text.splitlines():
        chunk = chunk.strip()
        if not chunk:
            continue
        try:
            docs.append(json.loads(chunk))
        except ValueError:
            if "NaN" in chunk or "Infinity" in chunk:
                return "NaN/Infinity in output"
            return None
    for d in docs:
        for path, v in _numbers(d):
            if isinstance(v, float) and not math.isfinite(v):
                return f"{path} = {v}"
            if v < 0 and not any(s in path for s in _SIGNED):
                return f"{path} = {v}"
    return None


def run_case(case: Case, timeout_s: float) -> tuple[str, str]:
    """(verdict, detail) for one case; runs ``loraplan.cli.main`` in this process."""
    from loraplan.cli import main

    with tempfile.TemporaryDirectory(prefix="loraplan-fuzz-") as d:
        for name, data in case.files.items():
            p = Path(d, name)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        if case.special == "fifo":
            os.mkfifo(Path(d, "config.json"))
        argv = [a.replace("{dir}", d) for a in case.argv]
        out, err = io.StringIO(), io.StringIO()
        old = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main(argv)
        except _Timeout:
            return "hang", f"> {timeout_s:g} s"
        except BaseException as e:  # noqa: BLE001 - anything escaping main is the finding
            if isinstance(e, SystemExit):
                code = e.code if isinstance(e.code, int) else 1
            else:
                return "traceback", f"{type(e).__name__}: {str(e)[:160]}"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        text = out.getvalue()
        if code == 0 and "--out" in argv:
            p = Path(argv[argv.index("--out") + 1])
            text = p.read_text() if p.is_file() else ""
    if code == 0:
        bad = insane_output(text)
        if bad:
            return "wrong_success", f"output {bad}"
        if case.expect == "invalid":
            return "wrong_success", "exit 0"
        return "ok", ""
    if code == 2:
        lines = [l for l in err.getvalue().splitlines() if l.strip()]
        if "Traceback" in err.getvalue():
            return "traceback", lines[-1][:160] if lines else ""
        if case.expect == "valid":
            return "wrong_refusal", (lines[0][:160] if lines else "")
        return "ok", ""
    return "traceback", f"exit {code}: {err.getvalue().strip()[-160:]}"


def limit_memory(gib: float) -> None:
    """Cap this process's address space so a memory blow-up fails fast instead of swapping."""
    lim = int(gib * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (lim, lim))


def fuzz(n: int, seed: int, timeout_s: float = 10.0) -> dict:
    """Run ``n`` cases; returns counts per verdict and the findings (case, verdict, detail)."""
    import warnings

    counts: collections.Counter = collections.Counter()
    findings = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for case in make_cases(n, seed):
            verdict, detail = run_case(case, timeout_s)
            counts[verdict] += 1
            if verdict != "ok":
                findings.append((case, verdict, detail))
    return {"counts": counts, "findings": findings}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds per case before it counts as a hang")
    ap.add_argument("--memory-gib", type=float, default=8.0, help="address-space cap of this process")
    ap.add_argument("--show", type=int, default=5, help="examples shown per verdict")
    args = ap.parse_args(argv)
    limit_memory(args.memory_gib)
    t0 = time.perf_counter()
    res = fuzz(args.n, args.seed, args.timeout)
    dt = time.perf_counter() - t0
    c = res["counts"]
    print(f"{args.n} cases (seed {args.seed}) in {dt:.0f} s: " + ", ".join(f"{k} {c[k]}" for k in
          ("ok", "traceback", "hang", "wrong_success", "wrong_refusal")))
    by = collections.defaultdict(list)
    for case, verdict, detail in res["findings"]:
        by[verdict].append((case, detail))
    for verdict, items in by.items():
        kinds = collections.Counter(case.what.split(":")[0].split(" ")[0] + " " + detail.split(":")[0][:40]
                                    for case, detail in items)
        print(f"\n{verdict}: {len(items)} ({len(kinds)} kinds)")
        for case, detail in items[: args.show]:
            print(f"  {case.what[:70]:72s} -> {detail}")
    return 0 if sum(c[k] for k in ("traceback", "hang", "wrong_success")) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
