"""Operator settings from the environment, and the `kopf run` command line built from them."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from ms2mg_operator.__main__ import kopf_arguments
from ms2mg_operator.config import OperatorSettings


def test_defaults(settings: OperatorSettings) -> None:
    default = OperatorSettings()
    assert default.all_namespaces
    assert default.log_format == "plain"
    assert default.label_prefix == "ms2mg.io"
    assert default.converter_service_account == "ms2mg-converter"
    assert default.default_resources["requests"] == {"cpu": "1", "memory": "4Gi"}
    assert (default.recheck_seconds, default.progress_seconds) == (30.0, 15.0)


def test_default_allow_lists_are_the_operators_own(settings: OperatorSettings) -> None:
    """Nothing configured: only the converter image's repository (any tag) and the converter ServiceAccount."""
    assert [p.text for p in settings.image_patterns] == ["registry.example/ms2mg-converter"]
    assert settings.service_account_allowed("ms2mg-converter")
    assert not settings.service_account_allowed("default")
    anything = settings.model_copy(update={"allowed_service_accounts": ["*"]})
    assert anything.service_account_allowed("default")


def test_environment(monkeypatch: pytest.MonkeyPatch, settings: OperatorSettings) -> None:
    monkeypatch.setenv("MS2MG_CONVERTER_IMAGE", "registry.example/c:2")
    monkeypatch.setenv("MS2MG_WATCH_NAMESPACES", "team-a, team-b,")
    monkeypatch.setenv("MS2MG_ALLOWED_IMAGES", "registry.example/*, docker.io/ms2mg/converter@sha256:" + "a" * 64)
    monkeypatch.setenv("MS2MG_ALLOWED_SERVICE_ACCOUNTS", "converter,reader")
    monkeypatch.setenv("MS2MG_RECHECK_SECONDS", "7")
    monkeypatch.setenv("MS2MG_PROGRESS_SECONDS", "4.5")
    monkeypatch.setenv("MS2MG_DEFAULT_RESOURCES", '{"limits": {"memory": "8Gi"}}')
    monkeypatch.setenv("MS2MG_DEFAULT_TTL_SECONDS_AFTER_FINISHED", "60")
    monkeypatch.setenv("MS2MG_LOG_FORMAT", "json")
    monkeypatch.setenv("MS2MG_METRICS_PORT", "9000")
    loaded = OperatorSettings()
    assert loaded.converter_image == "registry.example/c:2"
    assert loaded.watch_namespaces == ["team-a", "team-b"]
    assert not loaded.all_namespaces
    assert loaded.allowed_images == ["registry.example/*", "docker.io/ms2mg/converter@sha256:" + "a" * 64]
    assert [p.text for p in loaded.image_patterns] == loaded.allowed_images
    assert loaded.allowed_service_accounts == ["converter", "reader"]
    assert loaded.service_account_allowed("reader") and loaded.service_account_allowed("ms2mg-converter")
    assert not loaded.service_account_allowed("default")
    assert (loaded.recheck_seconds, loaded.progress_seconds) == (7.0, 4.5)
    assert loaded.default_resources == {"limits": {"memory": "8Gi"}}
    assert loaded.default_ttl_seconds_after_finished == 60
    assert loaded.log_format == "json"
    assert loaded.metrics_port == 9000


@pytest.mark.parametrize(("name", "value"), [("MS2MG_LOG_FORMAT", "xml"), ("MS2MG_METRICS_PORT", "70000"),
                                             ("MS2MG_DEFAULT_BACKOFF_LIMIT", "-1"),
                                             ("MS2MG_ALLOWED_IMAGES", "registry.example/"),
                                             ("MS2MG_ALLOWED_IMAGES", "registry.example/ms2mg*"),
                                             ("MS2MG_CONVERTER_IMAGE", "Not An Image"),
                                             ("MS2MG_RECHECK_SECONDS", "0"), ("MS2MG_PROGRESS_SECONDS", "-1")])
def test_bad_environment(monkeypatch: pytest.MonkeyPatch, settings: OperatorSettings, name: str,
                         value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        OperatorSettings()


def test_star_means_all_namespaces(monkeypatch: pytest.MonkeyPatch, settings: OperatorSettings) -> None:
    monkeypatch.setenv("MS2MG_WATCH_NAMESPACES", "*")
    assert OperatorSettings().all_namespaces


def test_kopf_arguments_all_namespaces(settings: OperatorSettings) -> None:
    args = kopf_arguments(OperatorSettings(), ["--verbose"])
    assert args[:4] == ["run", "--standalone", "--module", "ms2mg_operator.handlers"]
    assert "--all-namespaces" in args
    assert "--liveness=http://0.0.0.0:8081/healthz" in args
    assert args[args.index("--log-format") + 1] == "full"
    assert args[-1] == "--verbose"


def test_kopf_arguments_namespaces_json_no_liveness(settings: OperatorSettings) -> None:
    ours = OperatorSettings(watch_namespaces=["a", "b"], log_format="json", liveness_port=0)
    args = kopf_arguments(ours)
    assert "--all-namespaces" not in args
    assert args.count("--namespace") == 2 and "a" in args and "b" in args
    assert not any(a.startswith("--liveness") for a in args)
    assert args[args.index("--log-format") + 1] == "json"


def test_importing_the_operator_loads_no_torch_or_numpy() -> None:
    code = ("import sys, ms2mg_operator.handlers, ms2mg_operator.__main__, ms2mg_operator.crdgen; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'safetensors')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_main_help_runs() -> None:
    done = subprocess.run([sys.executable, "-m", "ms2mg_operator", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0
    assert "--liveness" in done.stdout


@pytest.mark.parametrize("ours", [OperatorSettings(metrics_port=0),
                                  OperatorSettings(log_format="json", watch_namespaces=["a", "b"])])
def test_kopf_accepts_the_arguments(ours: OperatorSettings) -> None:
    import kopf.cli

    params = kopf.cli.run.make_context("run", kopf_arguments(ours)[1:]).params
    assert params["standalone"] is True
    assert params["modules"] == ("ms2mg_operator.handlers",)
    assert params["clusterwide"] is ours.all_namespaces
    assert params["log_format"].name.lower() == {"plain": "full", "json": "json"}[ours.log_format]


def test_empty_optional_variables_mean_unset(monkeypatch) -> None:
    from ms2mg_operator.config import OperatorSettings

    monkeypatch.setenv("MS2MG_DEFAULT_TTL_SECONDS_AFTER_FINISHED", "")
    monkeypatch.setenv("MS2MG_DEFAULT_ACTIVE_DEADLINE_SECONDS", " ")
    monkeypatch.setenv("MS2MG_IMAGE_PULL_POLICY", "")
    s = OperatorSettings()
    assert s.default_ttl_seconds_after_finished is None
    assert s.default_active_deadline_seconds is None
    assert s.image_pull_policy is None
