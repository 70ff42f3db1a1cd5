"""Container image references and the allow-list patterns matched against them (pure functions).

A reference is `[registry/]repository[:tag][@digest]`, read as a container runtime reads it: the first
component is the registry only when it contains a `.` or a `:`, or is `localhost`, and more components follow;
otherwise the registry is Docker Hub (`docker.io`), where a one-component repository lives under `library/`. So
`ms2mg-converter:0.1`, `docker.io/ms2mg-converter` and `docker.io/library/ms2mg-converter@sha256:...` are the same
repository, and `registry.example.com/ml/ms2mg-converter-evil` is *not* `registry.example.com/ml/ms2mg-converter`.

Patterns (`MS2MG_ALLOWED_IMAGES`, the chart's `allowedImages`):

* `REPOSITORY` -- that repository, any tag or digest (`registry.example.com/ml/ms2mg-converter`);
* `REPOSITORY:TAG`, `REPOSITORY@DIGEST` -- only that tag / that digest;
* `PREFIX/*` -- every repository below `PREFIX` (`registry.example.com/ml/*`, `registry.example.com/*`);
* `*` -- any image.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DOCKER_HUB = "docker.io"
_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_DOMAIN = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
                     r"(?::[0-9]+)?$|^\[[0-9a-fA-F:]+\](?::[0-9]+)?$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST = re.compile(r"^[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}$")
MAX_REFERENCE = 512


class ImageError(ValueError):
    """Not a valid image reference or pattern."""


@dataclass(frozen=True)
class ImageRef:
    """A parsed reference; `registry` and `path` are normalised (Docker Hub's defaults filled in)."""

    registry: str
    path: str
    tag: str | None = None
    digest: str | None = None

    @property
    def repository(self) -> str:
        return f"{self.registry}/{self.path}"

    def __str__(self) -> str:
        return self.repository + (f":{self.tag}" if self.tag else "") + (f"@{self.digest}" if self.digest else "")


def _is_registry(component: str) -> bool:
    return "." in component or ":" in component or component == "localhost"


def _split_name(name: str, *, hub_library: bool = True) -> tuple[str, str]:
    """(registry, path) of a repository name, normalised (`hub_library`: a one-component Docker Hub name lies
    under `library/`, as for an image; not for the stem of a `PREFIX/*` pattern, where it is a namespace)."""
    parts = name.split("/")
    registry = DOCKER_HUB
    if len(parts) > 1 and _is_registry(parts[0]):
        registry = parts.pop(0)
        if not _DOMAIN.match(registry):
            raise ImageError(f"{registry!r} is not a valid registry host")
        registry = registry.lower()
    if registry == "index.docker.io":
        registry = DOCKER_HUB
    if not parts or not all(_COMPONENT.match(p) for p in parts):
        raise ImageError(f"{name!r} is not a valid repository name (lower-case letters, digits and separators)")
    if hub_library and registry == DOCKER_HUB and len(parts) == 1:
        parts.insert(0, "library")
    return registry, "/".join(parts)


def parse_image(reference: str) -> ImageRef:
    """Parse `reference`; raises `ImageError` when it is not a valid image reference."""
    if not reference or len(reference) > MAX_REFERENCE or reference != reference.strip():
        raise ImageError(f"{reference!r} is not a valid image reference")
    rest, _, digest = reference.partition("@")
    if digest and not _DIGEST.match(digest):
        raise ImageError(f"{digest!r} is not a valid image digest")
    tag = None
    slash, colon = rest.rfind("/"), rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1:]
        if not _TAG.match(tag):
            raise ImageError(f"{tag!r} is not a valid image tag")
    registry, path = _split_name(rest)
    return ImageRef(registry=registry, path=path, tag=tag, digest=digest or None)


@dataclass(frozen=True)
class ImagePattern:
    """One allow-list entry (see the module docstring)."""

    text: str
    any_image: bool = False
    prefix: tuple[str, str] | None = None
    """(registry, path prefix) of a `PREFIX/*` pattern; the path prefix is empty for a whole registry."""
    exact: ImageRef | None = None

    def matches(self, image: ImageRef) -> bool:
        if self.any_image:
            return True
        if self.prefix is not None:
            registry, path = self.prefix
            return image.registry == registry and (not path or image.path.startswith(path + "/"))
        ref = self.exact
        return (ref is not None and ref.repository == image.repository
                and (ref.tag is None or ref.tag == image.tag) and (ref.digest is None or ref.digest == image.digest))


def parse_pattern(text: str) -> ImagePattern:
    """Parse one allow-list entry; raises `ImageError` when it is not a valid pattern."""
    text = text.strip()
    if text == "*":
        return ImagePattern(text, any_image=True)
    if text.endswith("/*"):
        stem = text[:-2]
        if "/" not in stem and _is_registry(stem):
            if not _DOMAIN.match(stem):
                raise ImageError(f"{stem!r} is not a valid registry host")
            return ImagePattern(text, prefix=(stem.lower(), ""))
        if "*" in stem or ":" in stem.rpartition("/")[2] or "@" in stem:
            raise ImageError(f"{text!r}: a prefix pattern is a registry or repository path followed by '/*'")
        return ImagePattern(text, prefix=_split_name(stem, hub_library=False))
    if "*" in text:
        raise ImageError(f"{text!r}: '*' is allowed only alone or as a whole last component ('prefix/*')")
    return ImagePattern(text, exact=parse_image(text))


def image_allowed(reference: str, patterns: list[ImagePattern]) -> bool:
    """True when `reference` is a valid reference that one of `patterns` matches."""
    try:
        image = parse_image(reference)
    except ImageError:
        return False
    return any(p.matches(image) for p in patterns)
