"""Operator settings from the environment (`MS2MG_*`), validated once at start-up.

Every setting has a default that works for a single-namespace trial; the Helm chart sets them from its values.
Lists are given as comma-separated strings (`MS2MG_WATCH_NAMESPACES=team-a,team-b`); objects as JSON
(`MS2MG_DEFAULT_RESOURCES='{"requests": {"cpu": "2"}}'`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, JsonValue, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from ms2mg_operator import __version__
from ms2mg_operator.images import ImageError, ImagePattern, parse_image, parse_pattern
from ms2mg_operator.keys import Keys

CommaList = Annotated[list[str], NoDecode]

DEFAULT_RESOURCES: dict[str, JsonValue] = {
    "requests": {"cpu": "1", "memory": "4Gi"},
    "limits": {"memory": "16Gi"},
}


class OperatorSettings(BaseSettings):
    """Settings of one operator process (environment variables `MS2MG_<NAME>`)."""

    model_config = SettingsConfigDict(env_prefix="MS2MG_", frozen=True, extra="ignore")

    converter_image: str = Field(
        default=f"ms2mg-converter:{__version__}", min_length=1,
        description="Image of the converter Jobs when a resource gives no spec.image.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        default=None, description="imagePullPolicy of the converter container (unset: Kubernetes' default).")
    allowed_images: CommaList = Field(
        default_factory=list,
        description="Image patterns a spec.image must match: a repository (any tag), REPO:TAG, REPO@DIGEST, "
                    "PREFIX/* (every repository below PREFIX) or * (any image). Empty: only the repository of "
                    "converter_image.")
    allowed_service_accounts: CommaList = Field(
        default_factory=list,
        description="ServiceAccounts a spec.serviceAccountName may name besides converter_service_account, or * "
                    "for any. Empty: only converter_service_account.")
    default_resources: dict[str, JsonValue] = Field(
        default_factory=lambda: dict(DEFAULT_RESOURCES),
        description="Container resources when a resource gives no spec.resources.")
    default_backoff_limit: int = Field(default=2, ge=0, description="Job backoffLimit default.")
    default_ttl_seconds_after_finished: int | None = Field(
        default=86400, ge=0, description="Job ttlSecondsAfterFinished default (unset: keep finished Jobs).")
    default_active_deadline_seconds: int | None = Field(
        default=None, ge=1, description="Job activeDeadlineSeconds default (unset: no limit).")
    watch_namespaces: CommaList = Field(
        default_factory=list,
        description="Namespaces to watch: one, several (comma-separated), or empty/'*' for all namespaces.")
    log_format: Literal["plain", "json"] = Field(default="plain", description="Log line format.")
    metrics_port: int = Field(default=8080, ge=0, le=65535,
                              description="Port of /metrics (0: no metrics server).")
    liveness_port: int = Field(default=8081, ge=0, le=65535,
                               description="Port of kopf's /healthz liveness endpoint (0: none).")
    converter_service_account: str = Field(
        default="ms2mg-converter", min_length=1,
        description="ServiceAccount of converter pods when a resource gives none (needs no API access).")
    label_prefix: str = Field(default="ms2mg.io", min_length=1,
                              description="Prefix of the operator's labels on Jobs and pods.")
    run_as_user: int = Field(default=10001, ge=1, description="UID of the converter process.")
    run_as_group: int = Field(default=10001, ge=1, description="GID of the converter process.")
    fs_group: int = Field(default=10001, ge=1, description="fsGroup of the converter pod's volumes.")
    tmp_size_limit: str = Field(default="1Gi", description="sizeLimit of the /tmp emptyDir.")
    api_timeout_seconds: float = Field(default=30.0, gt=0, description="Timeout of one API request.")
    recheck_seconds: float = Field(
        default=30.0, gt=0,
        description="Interval of the re-checks of a resource that waits (a missing PVC, a destination used by an "
                    "older resource, the previous generation's pods), and the delay of API retries.")
    progress_seconds: float = Field(
        default=15.0, gt=0,
        description="Interval of the progress reads (pod log tail) while a converter pod runs; nothing is "
                    "polled otherwise.")
    log_tail_lines: int = Field(default=20, ge=1, le=1000,
                                description="Pod log lines read to find the last progress line.")

    @field_validator("allowed_images", "allowed_service_accounts", "watch_namespaces", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("default_ttl_seconds_after_finished", "default_active_deadline_seconds", "image_pull_policy",
                     mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        """An empty variable (`MS2MG_DEFAULT_TTL_SECONDS_AFTER_FINISHED=`) means unset, as the docs say."""
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @model_validator(mode="after")
    def _check_images(self) -> OperatorSettings:
        try:
            parse_image(self.converter_image)
            for pattern in self.allowed_images:
                parse_pattern(pattern)
        except ImageError as e:
            raise ValueError(str(e)) from e
        return self

    @property
    def image_patterns(self) -> list[ImagePattern]:
        """The allow-list of spec.image (default: the converter image's repository, any tag)."""
        if self.allowed_images:
            return [parse_pattern(p) for p in self.allowed_images]
        return [parse_pattern(parse_image(self.converter_image).repository)]

    def service_account_allowed(self, name: str) -> bool:
        """The converter ServiceAccount always; others when listed (or `*`)."""
        allowed = self.allowed_service_accounts
        return name == self.converter_service_account or "*" in allowed or name in allowed

    @property
    def keys(self) -> Keys:
        """Label and annotation keys under `label_prefix`."""
        return Keys(self.label_prefix)

    @property
    def all_namespaces(self) -> bool:
        """True when every namespace is watched."""
        return not self.watch_namespaces or "*" in self.watch_namespaces
