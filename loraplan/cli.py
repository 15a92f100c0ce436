"""The ``loraplan`` command: a click group of thin wrappers over the library.

Each subcommand lives in ``loraplan/commands/<name>.py`` and exposes ``command``; it is
imported only when invoked, so ``loraplan estimate`` never pays for torch or pandas.
User errors (LoraplanError, click usage errors) print one line and exit 2: never a traceback.
"""

from __future__ import annotations

import importlib
import sys

import click

from .errors import LoraplanError

#: command name -> (module, one-line help shown in `loraplan --help`)
COMMANDS = {
    "estimate": ("estimate", "Predict peak GPU memory (itemised) and step time for one setup."),
    "models": ("catalog_cmds", "List the built-in model catalog."),
    "gpus": ("catalog_cmds", "List the built-in GPU catalog."),
    "explain": ("explain", "What dominates the peak memory, why, and which changes lower it."),
    "plan": ("plan", "Which GPUs fit, largest batch/sequence, time and cost of a whole job."),
    "sweep": ("sweep", "Estimate a grid of setups fast; write CSV, JSON lines or Parquet."),
    "profile": ("profile", "Run short real training bursts and record memory and time."),
    "calibrate": ("calibrate", "Fit per-GPU coefficients from profile records."),
    "validate": ("validate", "Compare estimates with measured records."),
    "report": ("report", "Write HTML/markdown comparison and validation reports."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        mod, _ = COMMANDS[name]
        module = importlib.import_module(f"loraplan.commands.{mod}")
        return getattr(module, name.replace("-", "_") + "_command", None) or getattr(module, "command")

    def format_commands(self, ctx, formatter):
        rows = [(n, COMMANDS[n][1]) for n in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="loraplan")
def cli():
    """loraplan: will a LoRA/QLoRA fine-tuning run fit, how fast, on which GPU, at what cost.

    Estimates predict the protocol of a plain transformers + peft + bitsandbytes training loop
    (AutoModelForCausalLM, sdpa attention, prepare_model_for_kbit_training for quantized
    bases, get_peft_model, torch/bitsandbytes optimizer): see README.md.
    """


def main(argv=None) -> int:
    """Entry point: one-line errors with exit code 2 for anything the user can fix."""
    try:
        cli.main(args=argv, prog_name="loraplan", standalone_mode=False)
    except LoraplanError as e:
        click.echo(f"error: {e}", err=True)
        return e.exit_code
    except click.exceptions.NoSuchOption as e:
        hint = f" (did you mean {', '.join('--' + p.lstrip('-') for p in e.possibilities)}?)" if e.possibilities else ""
        click.echo(f"error: unknown option {e.option_name}{hint}; see 'loraplan {_sub(argv)}--help'", err=True)
        return 2
    except click.exceptions.UsageError as e:
        click.echo(f"error: {e.format_message().rstrip('.')}; see 'loraplan {_sub(argv)}--help'", err=True)
        return 2
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:
        click.echo(f"error: {e.format_message()}", err=True)
        return e.exit_code
    except BrokenPipeError:
        return 0
    return 0


def _sub(argv) -> str:
    args = sys.argv[1:] if argv is None else list(argv)
    return f"{args[0]} " if args and args[0] in COMMANDS else ""


if __name__ == "__main__":
    sys.exit(main())
