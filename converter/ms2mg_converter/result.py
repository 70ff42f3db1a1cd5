"""The two machine-readable outputs of `ms2mg convert` that the operator consumes.

* `ConversionResult`: one JSON object written to `--result-file` on exit, success or failure. In a
  Kubernetes Job the file is `/dev/termination-log`, so it becomes the container's termination message
  (at most 4096 bytes: `to_json` keeps it below that).
* `ProgressEvent`: one JSON line on stdout per finished tensor group with `--progress json`.

Both are plain pydantic models without torch, importable by the operator. Both ignore fields they do not
know, so an operator reading the output of a newer converter never fails on an added field.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

TERMINATION_MESSAGE_LIMIT = 4096
"""Kubernetes keeps at most this many bytes of a termination message."""


class ConversionResult(BaseModel):
    """Outcome of one `ms2mg convert` run (camelCase keys, the same as the resource's `status.result`)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, frozen=True, extra="ignore")

    status: Literal["Succeeded", "Failed"]
    reason: str = Field(description="CamelCase reason, e.g. Converted, InvalidSource, DestinationExists.")
    message: str = Field(default="", description="Human-readable summary or error message.")
    exit_code: int = 0
    files: int = Field(default=0, description="Number of files written.")
    bytes: int = Field(default=0, description="Bytes written.")
    seconds: float = Field(default=0.0, description="Wall time of the run.")
    padded_vocab_size: int | None = Field(default=None, description="Rows of the written embedding table.")
    manifest_path: str | None = Field(default=None, description="Path of ms2mg-manifest.json.")
    verified: bool = Field(default=False, description="The output was checked against the source.")
    peak_rss_bytes: int | None = Field(default=None, description="Peak resident memory of the converter process.")
    defaulted: list[str] = Field(
        default_factory=list,
        description="Model facts that neither the flags, the MindFormers YAML nor the naming family stated and "
                    "that were set to Megatron's defaults (e.g. rotary_base, norm_epsilon): check them.")
    converter_version: str = ""

    def to_json(self) -> str:
        """Serialise, shortening the message so the whole object fits a termination message."""
        text = self.model_dump_json(by_alias=True)
        overflow = len(text.encode()) - (TERMINATION_MESSAGE_LIMIT - 64)
        if overflow <= 0:
            return text
        keep = max(0, len(self.message.encode()) - overflow - 16)
        short = self.message.encode()[:keep].decode(errors="ignore") + " [truncated]"
        return self.model_copy(update={"message": short}).model_dump_json(by_alias=True)


class ProgressEvent(BaseModel):
    """One `--progress json` line: `{"done": n, "total": m, "bytes": b}`."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    done: int = Field(ge=0, description="Tensor groups finished so far.")
    total: int = Field(ge=0, description="Tensor groups in the whole plan.")
    bytes: int = Field(ge=0, description="Bytes written so far.")
