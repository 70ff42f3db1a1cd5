"""Generate the CustomResourceDefinition of `CheckpointConversion` from the pydantic models.

pydantic's JSON Schema (2020-12) is turned into a Kubernetes *structural* openAPIV3Schema:
* `$defs` are inlined, keeping a field's own description over the referenced type's docstring;
* titles are dropped (Kubernetes does not show them);
* `anyOf: [X, {type: null}]` (an optional field) becomes plain `X`, not `nullable: true`: the API server then
  prunes an explicit `null` in a manifest as if the field were absent (rather than storing it), which is what
  Helm templates and GitOps tools produce for "unset", and it avoids null-versus-enum corner cases;
* `additionalProperties: false` next to `properties` (pydantic's `extra="forbid"`) is dropped: Kubernetes
  rejects it, and a structural schema prunes (or, with strict field validation, refuses) unknown fields;
* defaults: in `spec`, only constant defaults of the conversion's meaning are kept (parallelism, vocab
  padding, dtype, key names, verify, overwrite; nested objects default to `{}` so their fields default too),
  so `kubectl get -o yaml` shows what will run and a later operator version cannot silently change it.
  `null` defaults are dropped. `status` carries no defaults: only the operator writes it.

CLI: `python -m ms2mg_operator.crdgen [--check] [--output PATH ...] [--chart-template PATH ...]` writes (or
checks) the CRD YAML. The default outputs, relative to the working directory (run it from the repository root),
are `crds/checkpointconversions.ms2mg.io.yaml` and, when the chart exists, the Helm chart's CRD template
`charts/ms2mg/templates/crd-checkpointconversions.yaml` (`render_chart_template()`: the same text with the
chart's labels, the `crds.enabled` switch and the `crds.keep` annotation templated in). `render_crd_yaml()` is
the hook for other wrappers that add templating around the same text.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import yaml
from pydantic import BaseModel

from ms2mg_operator.api import v1alpha1 as api

JsonDict = dict[str, object]

CRD_NAME = f"{api.PLURAL}.{api.GROUP}"
DEFAULT_OUTPUT = Path("crds") / f"{CRD_NAME}.yaml"
REGENERATE_COMMAND = "python -m ms2mg_operator.crdgen"
HEADER = (
    "# Generated from ms2mg_operator/api/v1alpha1.py by `python -m ms2mg_operator.crdgen`. Do not edit.\n"
)
CHART_DIR = Path("charts") / "ms2mg"
CHART_TEMPLATE = CHART_DIR / "templates" / "crd-checkpointconversions.yaml"
CHART_HEADER = (
    "{{- /* Generated from ms2mg_operator/api/v1alpha1.py by `python -m ms2mg_operator.crdgen`. Do not edit. */}}\n"
    "{{- if .Values.crds.enabled }}\n"
)
CHART_METADATA = (
    "  labels:\n"
    "    {{- include \"ms2mg.labels\" . | nindent 4 }}\n"
    "  {{- if .Values.crds.keep }}\n"
    "  annotations:\n"
    "    # `helm uninstall` leaves the CRD, and with it every CheckpointConversion, in place\n"
    "    helm.sh/resource-policy: keep\n"
    "  {{- end }}\n"
)

READY = '?(@.type=="Ready")'
PRINTER_COLUMNS: list[JsonDict] = [
    {"name": "Status", "type": "string", "jsonPath": ".status.phase",
     "description": "Phase of the observed generation: Waiting, Rejected, Queued, Pending, Running, Succeeded or "
                    "Failed."},
    {"name": "Reason", "type": "string", "jsonPath": f".status.conditions[{READY}].reason",
     "description": "Reason of the Ready condition: the most specific word for the state."},
    {"name": "TP", "type": "integer", "jsonPath": ".spec.parallelism.tensor",
     "description": "Tensor-parallel size of the output."},
    {"name": "PP", "type": "integer", "jsonPath": ".spec.parallelism.pipeline",
     "description": "Pipeline-parallel size of the output."},
    {"name": "Progress", "type": "string", "jsonPath": ".status.progress",
     "description": "Tensor groups converted so far / in total."},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {"name": "Job", "type": "string", "jsonPath": ".status.jobName", "priority": 1,
     "description": "The Job of the observed generation."},
    {"name": "Message", "type": "string", "jsonPath": f".status.conditions[{READY}].message", "priority": 1,
     "description": "Message of the Ready condition."},
]


KEY_ORDER = ("type", "format", "description", "default", "enum", "minimum", "maximum", "minLength",
             "maxLength", "pattern", "minItems", "maxItems", "maxProperties", "required", "properties",
             "items", "additionalProperties")


def _ordered(node: JsonDict) -> JsonDict:
    """Keys in a fixed, readable order (known keys first, then the rest alphabetically)."""
    rank = {k: i for i, k in enumerate(KEY_ORDER)}
    return dict(sorted(node.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0])))


def _resolve(node: object, defs: JsonDict) -> object:
    """Inline `$ref`s recursively; sibling keys of a `$ref` (description, default) win over the target's."""
    if isinstance(node, list):
        return [_resolve(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    node = {k: _resolve(v, defs) for k, v in node.items() if k != "$defs"}
    ref = node.pop("$ref", None)
    if isinstance(ref, str):
        target = defs[ref.rsplit("/", 1)[-1]]
        merged = cast(JsonDict, _resolve(copy.deepcopy(target), defs))
        merged.update(node)
        node = merged
    return node


def _collapse_optional(node: JsonDict) -> JsonDict:
    """`anyOf: [X, {type: null}]` -> X with the outer keys (description, default) on top."""
    options = node.get("anyOf")
    if not isinstance(options, list):
        return node
    rest = [o for o in options if o != {"type": "null"}]
    if len(rest) != 1 or len(rest) == len(options):
        raise ValueError(f"unsupported union in CRD schema: {options!r}")
    outer = {k: v for k, v in node.items() if k != "anyOf"}
    return {**cast(JsonDict, rest[0]), **outer}


def _structural(node: object, *, keep_defaults: bool) -> object:
    """Make one resolved schema node structural (see the module docstring)."""
    if isinstance(node, list):
        return [_structural(item, keep_defaults=keep_defaults) for item in node]
    if not isinstance(node, dict):
        return node
    node = _collapse_optional(cast(JsonDict, node))
    out: JsonDict = {}
    for key, value in node.items():
        if key == "title" or (key == "default" and (value is None or not keep_defaults)):
            continue
        if key == "additionalProperties" and value is False:
            continue
        if key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            # JSON Schema 2020's numeric bound -> OpenAPI v3.0's bound plus a boolean, as Kubernetes wants it
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            value = True
        if key in ("properties", "items", "additionalProperties") and isinstance(value, dict):
            value = {k: _structural(v, keep_defaults=keep_defaults) for k, v in value.items()} \
                if key == "properties" else _structural(value, keep_defaults=keep_defaults)
        out[key] = value
    return _ordered(out)


def model_schema(model: type[BaseModel], *, keep_defaults: bool) -> JsonDict:
    """The structural openAPIV3Schema of one pydantic model."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = cast(JsonDict, raw.get("$defs", {}))
    return cast(JsonDict, _structural(_resolve(raw, defs), keep_defaults=keep_defaults))


def openapi_schema() -> JsonDict:
    """The CRD's root schema: apiVersion, kind, metadata, spec (required) and status."""
    return {
        "type": "object",
        "description": api.ROOT_DESCRIPTION,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "ms2mg.io/v1alpha1"},
            "kind": {"type": "string", "description": "CheckpointConversion"},
            "metadata": {"type": "object"},
            "spec": model_schema(api.CheckpointConversionSpec, keep_defaults=True),
            "status": model_schema(api.CheckpointConversionStatus, keep_defaults=False),
        },
    }


def build_crd() -> JsonDict:
    """The whole CustomResourceDefinition as a dict."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME, "labels": {"app.kubernetes.io/name": "ms2mg"}},
        "spec": {
            "group": api.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": list(api.SHORT_NAMES),
                "categories": ["ms2mg"],
            },
            "versions": [{
                "name": api.VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": PRINTER_COLUMNS,
                "schema": {"openAPIV3Schema": openapi_schema()},
            }],
        },
    }


def render_crd_yaml(header: str = HEADER) -> str:
    """The CRD as YAML text, deterministic, with a generated-file header."""
    body = yaml.safe_dump(build_crd(), sort_keys=False, width=110, allow_unicode=True)
    return header + body


def render_chart_template() -> str:
    """The Helm chart's CRD template: the generated CRD behind `crds.enabled`, with the chart's labels and, behind
    `crds.keep`, the `helm.sh/resource-policy: keep` annotation. Everything else is the text of `render_crd_yaml`."""
    crd = build_crd()
    crd["metadata"] = {"name": CRD_NAME}
    body = yaml.safe_dump(crd, sort_keys=False, width=110, allow_unicode=True)
    if "{{" in body or "}}" in body:  # would be read as template actions
        raise ValueError("the CRD text contains '{{' or '}}'; escape it before templating")
    anchor = f"metadata:\n  name: {CRD_NAME}\n"
    if body.count(anchor) != 1:
        raise ValueError("unexpected CRD metadata layout")
    return CHART_HEADER + body.replace(anchor, anchor + CHART_METADATA) + "{{- end }}\n"


def _check(outputs: dict[Path, str]) -> int:
    stale = [p for p, text in outputs.items() if not p.is_file() or p.read_text(encoding="utf-8") != text]
    for path in stale:
        print(f"{path} is out of date with ms2mg_operator/api/v1alpha1.py; regenerate it with:\n"
              f"    {REGENERATE_COMMAND}", file=sys.stderr)
    return 1 if stale else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=REGENERATE_COMMAND, description=__doc__.splitlines()[0] if __doc__
                                     else None)
    parser.add_argument("--output", action="append", type=Path, metavar="PATH",
                        help=f"file to write (repeatable; default {DEFAULT_OUTPUT})")
    parser.add_argument("--chart-template", action="append", type=Path, metavar="PATH",
                        help=f"Helm chart CRD template to write (repeatable; default {CHART_TEMPLATE} when "
                             f"{CHART_DIR} exists and no --output is given)")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 when a file differs from the models")
    args = parser.parse_args(argv)
    plain: list[Path] = args.output or ([] if args.chart_template else [DEFAULT_OUTPUT])
    charts: list[Path] = args.chart_template or (
        [CHART_TEMPLATE] if not args.output and (CHART_DIR / "Chart.yaml").is_file() else [])
    outputs = {path: render_crd_yaml() for path in plain}
    outputs.update({path: render_chart_template() for path in charts})
    if args.check:
        return _check(outputs)
    for path, text in outputs.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
