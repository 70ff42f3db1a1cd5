"""Image references and allow-list patterns: whole repositories or explicit `prefix/*`, never a string prefix."""

from __future__ import annotations

import pytest

from ms2mg_operator.images import ImageError, ImageRef, image_allowed, parse_image, parse_pattern

DIGEST = "sha256:" + "0123456789abcdef" * 4


@pytest.mark.parametrize(("text", "expected"), [
    ("ms2mg-converter", ImageRef("docker.io", "library/ms2mg-converter")),
    ("ms2mg-converter:0.1.0", ImageRef("docker.io", "library/ms2mg-converter", tag="0.1.0")),
    ("team/ms2mg-converter", ImageRef("docker.io", "team/ms2mg-converter")),
    ("index.docker.io/library/ms2mg-converter", ImageRef("docker.io", "library/ms2mg-converter")),
    ("Registry.Example.com/ml/ms2mg-converter:v1@" + DIGEST,
     ImageRef("registry.example.com", "ml/ms2mg-converter", tag="v1", digest=DIGEST)),
    ("localhost:5000/ms2mg-converter", ImageRef("localhost:5000", "ms2mg-converter")),
    ("localhost/ms2mg-converter", ImageRef("localhost", "ms2mg-converter")),
    ("registry:5000/a/b/c", ImageRef("registry:5000", "a/b/c")),
    ("ghcr.io/org/ms2mg_converter.x", ImageRef("ghcr.io", "org/ms2mg_converter.x")),
])
def test_parse_image(text: str, expected: ImageRef) -> None:
    assert parse_image(text) == expected


@pytest.mark.parametrize("text", [
    "", " ms2mg", "ms2mg ", "UPPER/case", "a//b", "a/", "/a", "ms2mg:", "ms2mg:-bad", "ms2mg@sha256:abc",
    "ms2mg@" + DIGEST + "x", "bad_host:port:1/x", "a" * 600, "ms2mg; rm -rf /", "-ms2mg",
])
def test_invalid_images(text: str) -> None:
    with pytest.raises(ImageError):
        parse_image(text)


@pytest.mark.parametrize(("pattern", "image", "allowed"), [
    # a repository: any tag or digest of exactly that repository
    ("registry.example.com/ml/ms2mg-converter", "registry.example.com/ml/ms2mg-converter:0.2", True),
    ("registry.example.com/ml/ms2mg-converter", "registry.example.com/ml/ms2mg-converter@" + DIGEST, True),
    ("registry.example.com/ml/ms2mg-converter", "registry.example.com/ml/ms2mg-converter-evil:0.2", False),
    ("registry.example.com/ml/ms2mg-converter", "registry.example.com/ml/ms2mg-converter/evil:0.2", False),
    ("registry.example.com/ml/ms2mg-converter", "registry.example.com.evil.io/ml/ms2mg-converter", False),
    ("registry.example.com/ml/ms2mg-converter", "REGISTRY.example.com/ml/ms2mg-converter", True),
    # Docker Hub's defaults
    ("ms2mg-converter", "docker.io/library/ms2mg-converter:1", True),
    ("ms2mg-converter", "ms2mg-converter-evil:1", False),
    ("docker.io/team/conv", "team/conv", True),
    # a tag or a digest pins it
    ("registry.example.com/conv:1.0", "registry.example.com/conv:1.0", True),
    ("registry.example.com/conv:1.0", "registry.example.com/conv:1.1", False),
    ("registry.example.com/conv@" + DIGEST, "registry.example.com/conv@" + DIGEST, True),
    ("registry.example.com/conv@" + DIGEST, "registry.example.com/conv:latest", False),
    # explicit prefixes: whole path components below the prefix
    ("registry.example.com/ml/*", "registry.example.com/ml/ms2mg-converter:1", True),
    ("registry.example.com/ml/*", "registry.example.com/ml/team/ms2mg-converter:1", True),
    ("registry.example.com/ml/*", "registry.example.com/ml", False),
    ("registry.example.com/ml/*", "registry.example.com/ml-evil/x", False),
    ("registry.example.com/*", "registry.example.com/anything/at/all:1", True),
    ("registry.example.com/*", "registry.example.com.evil.io/x", False),
    ("team/*", "docker.io/team/x", True),
    ("team/*", "docker.io/library/x", False),
    ("*", "anything.example/x:1", True),
])
def test_patterns(pattern: str, image: str, allowed: bool) -> None:
    assert image_allowed(image, [parse_pattern(pattern)]) is allowed


def test_no_pattern_and_invalid_images_are_refused() -> None:
    assert not image_allowed("ms2mg-converter", [])
    assert not image_allowed("not an image", [parse_pattern("*")])


@pytest.mark.parametrize("pattern", ["registry.example/", "registry.example.com/ml*", "*/x", "a/*/b",
                                     "registry.example.com/x:1/*", "UPPER/*", "bad host/*"])
def test_invalid_patterns(pattern: str) -> None:
    with pytest.raises(ImageError):
        parse_pattern(pattern)
