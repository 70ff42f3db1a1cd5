"""The CheckpointConversion field reference in README.md, generated from the CRD schema (so from the
pydantic descriptions, the same text `kubectl explain` shows).

    python -m ms2mg_operator.reference          # rewrite the section of README.md between the markers
    python -m ms2mg_operator.reference --check  # exit 1 when README.md is stale (tests/operator run this)
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ms2mg_operator.crdgen import build_crd

README = Path(__file__).resolve().parents[2] / "README.md"
START, END = "<!-- crd-reference:start -->", "<!-- crd-reference:end -->"
COMMAND = "python -m ms2mg_operator.reference"


def _type(node: dict[str, Any]) -> str:
    kind = str(node.get("type", "object"))
    if "enum" in node:
        return " \\| ".join(f"`{v}`" for v in node["enum"])
    if kind == "array":
        return f"list of {_type(node.get('items', {}))}"
    if kind == "object" and node.get("x-kubernetes-preserve-unknown-fields"):
        return "object (as in a Pod)"
    if kind == "object" and "additionalProperties" in node:
        return f"map of {_type(node['additionalProperties'])}"
    return kind


def _rows(node: dict[str, Any], path: str, required: set[str]) -> Iterator[str]:
    for name, child in node.get("properties", {}).items():
        here = f"{path}.{name}"
        default = f"`{json.dumps(child['default'])}`" if "default" in child else ""
        need = "yes" if name in required else ""
        text = " ".join(str(child.get("description", "")).split()).replace("|", "\\|")
        yield f"| `{here}` | {_type(child)} | {need} | {default} | {text} |"
        target = child.get("items", child) if child.get("type") == "array" else child
        if target.get("properties") and not target.get("x-kubernetes-preserve-unknown-fields"):
            suffix = "[]" if child.get("type") == "array" else ""
            yield from _rows(target, here + suffix, set(target.get("required", [])))


def render() -> str:
    """The reference section (between the markers, markers included)."""
    crd: Any = build_crd()
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    lines = [START, "", "| field | type | required | default | description |", "|---|---|---|---|---|"]
    for part in ("spec", "status"):
        node = schema["properties"][part]
        lines += list(_rows(node, part, set(node.get("required", []))))
    return "\n".join([*lines, "", END])


def updated(readme: str) -> str:
    start, end = readme.index(START), readme.index(END) + len(END)
    return readme[:start] + render() + readme[end:]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="exit 1 when README.md is stale")
    args = parser.parse_args(argv)
    text = README.read_text(encoding="utf-8")
    new = updated(text)
    if args.check:
        if new != text:
            print(f"README.md's field reference is stale; regenerate it with: {COMMAND}")
            return 1
        return 0
    README.write_text(new, encoding="utf-8")
    print(f"wrote the field reference into {README}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
