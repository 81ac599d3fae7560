"""Validates Tether config files against conf/tether.schema.json, independently of Tether.

Usage: validate.py SCHEMA [--invalid] FILE...

Each FILE is YAML: a Tether config, or Kubernetes manifests whose ConfigMaps carry Tether
configs under data keys ending in `.yaml` (each of those is validated; manifests without one
are skipped, and said so). Prints one line per
config checked; exits 0 when every config is valid (with `--invalid`: when every one is
invalid), else 1. YAML is read as YAML 1.2 (ruamel.yaml, pure loader), as editors read it:
under YAML 1.1 `format: off` would be the boolean false.
"""

import json
import sys

from jsonschema import Draft202012Validator
from ruamel.yaml import YAML


def configs(path):
    """(name, config) for every Tether config in the file at `path`, and whether the file
    holds Kubernetes manifests."""
    yaml = YAML(typ="safe", pure=True)
    with open(path, encoding="utf-8") as f:
        docs = [d for d in yaml.load_all(f) if d is not None]
    found = []
    manifests = False
    for i, doc in enumerate(docs):
        if isinstance(doc, dict) and "apiVersion" in doc:
            manifests = True
            if doc.get("kind") == "ConfigMap":
                for key, text in (doc.get("data") or {}).items():
                    if key.endswith(".yaml"):
                        found.append((f"{path}[{i}].data.{key}", yaml.load(text)))
        else:
            found.append((path, doc))
    return found, manifests


def main(argv):
    schema_path, rest = argv[1], argv[2:]
    want_invalid = rest[:1] == ["--invalid"]
    files = rest[1:] if want_invalid else rest
    with open(schema_path, encoding="utf-8") as f:
        schema = json.load(f)
    Draft202012Validator.check_schema(schema)
    validator = Draft202012Validator(schema)
    failed = False
    checked = 0
    for path in files:
        found, manifests = configs(path)
        if not found and not manifests:
            print(f"{path}: no Tether config found")
            failed = True
        elif not found:
            print(f"{path}: Kubernetes manifests without a Tether config, skipped")
        for name, config in found:
            checked += 1
            errors = sorted(validator.iter_errors(config), key=lambda e: list(e.path))
            if want_invalid:
                if errors:
                    print(f"{name}: invalid, as expected: {errors[0].json_path}: {errors[0].message}")
                else:
                    print(f"{name}: valid, but should not be")
                    failed = True
            elif errors:
                failed = True
                for e in errors:
                    print(f"{name}: {e.json_path}: {e.message}")
            else:
                print(f"{name}: valid")
    if checked == 0:
        failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
