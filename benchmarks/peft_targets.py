"""PEFT's default LoRA targets as data: read the installed peft's
peft/utils/constants.py::TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING (parsed with ``ast``,
peft is not imported) and print, or write into loraplan/data/version-rules.json, the rule
``peft_lora_default_targets`` for that peft version.

    python benchmarks/peft_targets.py            # print the mapping and whether the data holds it
    python benchmarks/peft_targets.py --write    # add / replace the entry for the installed version
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata as md
import importlib.util
import json
import sys
from pathlib import Path

RULES = Path(__file__).resolve().parents[1] / "loraplan" / "data" / "version-rules.json"
NAME = "peft_lora_default_targets"


def installed_mapping() -> tuple[str, dict]:
    """(peft version, {model_type: [names] or a regex string}) from the installed peft's source."""
    spec = importlib.util.find_spec("peft")  # a top-level package: located, not executed
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("peft is not installed")
    src = Path(list(spec.submodule_search_locations)[0]) / "utils" / "constants.py"
    for node in ast.parse(src.read_text()).body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and getattr(node.targets[0], "id", None) == "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING"):
            return md.version("peft"), ast.literal_eval(node.value)
    raise SystemExit(f"{src}: TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING not found")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help=f"write the rule {NAME} into {RULES.name}")
    args = ap.parse_args(argv)
    version, mapping = installed_mapping()
    data = json.loads(RULES.read_text())
    from loraplan.versions import version_tuple

    release = ".".join(map(str, version_tuple(version)[:2]))
    rule = data["rules"].get(NAME)
    held = [e for e in (rule or {}).get("values", []) if e["value"] == mapping]
    print(f"peft {version}: {len(mapping)} model types; the data {'holds' if held else 'lacks'} this mapping")
    if args.write and not held:
        rule = rule or {"library": "peft", "values": [],
                        "source": "peft/utils/constants.py::TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING "
                                  "(LoraConfig.target_modules=None: peft/tuners/lora/model.py::"
                                  "_prepare_adapter_config), read by benchmarks/peft_targets.py"}
        since = release if rule["values"] else "0"
        rule["values"] = [e for e in rule["values"] if e["since"] != since] + [{"since": since, "value": mapping}]
        rule["values"].sort(key=lambda e: version_tuple(e["since"]))
        data["rules"][NAME] = rule
        RULES.write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote {NAME} (since {since}) into {RULES}")
    return 0 if held or args.write else 1


if __name__ == "__main__":
    sys.exit(main())
