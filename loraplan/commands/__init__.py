"""CLI subcommands: each module exposes a click command; ``loraplan.cli`` imports them lazily."""
