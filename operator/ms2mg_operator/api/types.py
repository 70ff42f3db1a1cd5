"""Types shared by the `CheckpointConversion` models: names, patterns, relative paths, base classes.

Spec models forbid unknown fields and are frozen; status models ignore unknown fields so that a status
written by another operator version still reads.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, JsonValue, WithJsonSchema
from pydantic.alias_generators import to_camel

JsonDict = dict[str, JsonValue]

GROUP = "ms2mg.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "CheckpointConversion"
PLURAL = "checkpointconversions"
SINGULAR = "checkpointconversion"
SHORT_NAMES = ("ckptconv",)

DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
CONDITION_REASON = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"
MAX_PATH = 1024
MAX_SIZE = 1 << 24
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")

PATH_RULES: list[JsonValue] = [
    {"rule": "!self.startsWith('/')", "message": "must be relative to the volume (no leading '/')"},
    {"rule": "!self.matches('(^|/)[.][.]?(/|$)')", "message": "must not contain '.' or '..' segments"},
    {"rule": "!self.contains('//') && !self.endsWith('/')",
     "message": "must not contain empty segments ('//' or a trailing '/')"},
]
OVERLAP_MESSAGE = "destination must not be, contain or lie inside the source on the same PVC"
OVERLAP_RULE: JsonDict = {
    "rule": "self.source.pvc != self.destination.pvc || (self.source.path != self.destination.path"
            " && !self.destination.path.startsWith(self.source.path + '/')"
            " && !self.source.path.startsWith(self.destination.path + '/'))",
    "message": OVERLAP_MESSAGE,
}


def check_relative_path(value: str) -> str:
    """Reject absolute paths, '.'/'..' segments, empty segments and control characters."""
    if value.startswith("/"):
        raise ValueError("must be relative to the volume (no leading '/')")
    if _CONTROL_CHARS.search(value):
        raise ValueError("must not contain control characters")
    segments = value.split("/")
    if "" in segments:
        raise ValueError("must not contain empty segments ('//' or a trailing '/')")
    if any(s in (".", "..") for s in segments):
        raise ValueError("must not contain '.' or '..' segments")
    return value


def paths_overlap(a: str, b: str) -> bool:
    """True when one relative path equals the other or lies inside it."""
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


RelativePath = Annotated[
    str,
    Field(min_length=1, max_length=MAX_PATH,
          json_schema_extra={"pattern": r"^[^\x00-\x1f\x7f]+$", "x-kubernetes-validations": PATH_RULES}),
    AfterValidator(check_relative_path),
]
ObjectName = Annotated[str, Field(min_length=1, max_length=253, pattern=DNS1123_SUBDOMAIN)]
Count = Annotated[int, Field(ge=1, le=MAX_SIZE)]
OpenObject = Annotated[
    dict[str, JsonValue],
    WithJsonSchema({"type": "object", "x-kubernetes-preserve-unknown-fields": True}),
]
NESTED_DEFAULT: JsonDict = {"default": {}}
"""Schema default of a nested object: the API server then fills its fields' own defaults."""


class Spec(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class Status(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


