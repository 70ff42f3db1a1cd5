"""The rendered Job: golden manifests, and the properties that matter whatever the golden files say."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from ms2mg_converter.cli.args import to_config
from ms2mg_converter.cli.main import _parser as converter_parser
from ms2mg_converter.errors import DETERMINISTIC_EXIT_CODES
from ms2mg_operator.api.v1alpha1 import CheckpointConversion, ObjectMeta
from ms2mg_operator.config import OperatorSettings
from ms2mg_operator.jobs import job_name, label_value, mounted_path, render_job
from tests.operator.conftest import make_body
from tests.operator.test_api import spec_with

GOLDEN = Path(__file__).parent / "golden"
REGENERATE = "UPDATE_GOLDEN=1 .venv/bin/pytest tests/operator/test_jobs.py"
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")

FULL = spec_with(
    model={"numLayers": 32, "hiddenSize": 4096, "ffnHiddenSize": 11008, "numAttentionHeads": 32,
           "numQueryGroups": 8, "kvChannels": 128, "swiglu": True, "addBiasLinear": False, "qkvBias": True,
           "qkLayernorm": False, "normalization": "RMSNorm", "positionEmbeddingType": "rope",
           "untieEmbeddingsAndOutputWeights": True, "seqLength": 4096},
    vocab={"trueSize": 32000, "makeDivisibleBy": 64, "padFill": "zero"}, dtype="fp16",
    transformerImpl="transformer_engine", layouts={"qkv": "grouped", "fc1": "interleaved"}, verify=False,
    overwrite=True, image="registry.example/ms2mg-converter:custom", resources={"limits": {"memory": "64Gi"}},
    nodeSelector={"pool": "cpu"}, tolerations=[{"key": "dedicated", "operator": "Exists"}],
    affinity={"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}},
    imagePullSecrets=[{"name": "regcred"}], serviceAccountName="converter", priorityClassName="batch-low",
    queueName="team-a", backoffLimit=0, activeDeadlineSeconds=7200, ttlSecondsAfterFinished=600,
    finalNormExtraState=False, ignoreKeys=["rng_state*", "*.extra"], allowNonfinite=True,
)
FACTS = spec_with(
    config={"configMap": {"name": "qwen2-yaml", "key": "finetune_qwen2_7b.yaml"}},
    model={"rotaryBase": 1000000.0, "normEpsilon": 1e-6, "maxPositionEmbeddings": 32768},
    layouts={"qkv": "contiguous", "fc1": "gate-up", "sourceTensorParallel": 4}, sourceDigest="sha256",
    parallelism={"tensor": 2, "pipeline": 4, "decoderFirstPipelineNumLayers": 6, "decoderLastPipelineNumLayers": 6},
)
WAVE2 = spec_with(
    source={"pvc": "mindformers", "path": "deepseek/checkpoint", "strategy": "deepseek/strategy",
            "ckptSuffix": "1_500"},
    output={"format": "torch"}, parallelism={"tensor": 2, "pipeline": 2, "expert": 4, "expertTensor": 2},
    moe={"groupedGemm": True, "routerTopk": 8, "routerScoreFunction": "sigmoid", "routerTopkScalingFactor": 2.5,
         "routerNumGroups": 8, "routerGroupTopk": 4, "routerPreSoftmax": False},
    model={"numAttentionHeads": 128, "qLoraRank": 1536, "kvLoraRank": 512, "ropeType": "yarn",
           "rotaryScalingFactor": 40.0, "mscaleAllDim": 1.0},
)
DIST = spec_with(output={"format": "torch_dist"}, parallelism={"tensor": 2, "pipeline": 2})
CASES = {
    "wave2": make_body(WAVE2),
    "torch-dist": make_body(DIST),
    "minimal": make_body(),
    "facts": make_body(FACTS),
    "full": make_body(FULL, generation=3),
    "same-pvc": make_body(spec_with(**{"destination.pvc": "mindformers", "destination.path": "out/tp2-pp2"})),
}


def conversion(body: dict[str, Any]) -> CheckpointConversion:
    return CheckpointConversion.model_validate(body)


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case: str, settings: OperatorSettings) -> None:
    rendered = yaml.safe_dump(render_job(conversion(CASES[case]), settings), sort_keys=False, width=110)
    path = GOLDEN / f"job-{case}.yaml"
    if os.environ.get("UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(rendered, encoding="utf-8")
    assert path.is_file(), f"{path} is missing; create it with: {REGENERATE}"
    assert rendered == path.read_text(encoding="utf-8"), f"the Job of case {case!r} changed; if intended, " \
                                                         f"regenerate the golden files with: {REGENERATE}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_args_parse_with_the_converter(case: str, settings: OperatorSettings) -> None:
    job = render_job(conversion(CASES[case]), settings)
    container: Any = job["spec"]["template"]["spec"]["containers"][0]  # type: ignore[index]
    assert container["command"] == ["ms2mg"]
    ns = converter_parser().parse_args(container["args"])
    assert ns.command == "convert"
    assert ns.progress == "json"
    assert str(ns.result_file) == "/dev/termination-log"
    config = to_config(ns)
    spec = conversion(CASES[case]).spec
    assert config.tensor_parallel == spec.parallelism.tensor
    assert config.pipeline_parallel == spec.parallelism.pipeline
    assert config.verify is spec.verify
    assert config.overwrite is spec.overwrite
    assert str(config.load_dir) == f"/mnt/source/{spec.source.path}"
    assert str(config.save_dir) == f"/mnt/destination/{spec.destination.path}"
    assert (str(config.load_root), str(config.save_root)) == ("/mnt/source", "/mnt/destination")
    if spec.model is not None:
        assert config.model == spec.model.to_overrides()
    assert config.vocab.true_vocab_size == spec.vocab.true_size
    assert config.vocab.pad_fill == spec.vocab.pad_fill
    assert config.dtype == spec.dtype
    assert config.transformer_impl == spec.transformer_impl
    assert config.final_norm_extra_state is spec.final_norm_extra_state
    assert config.ignore_keys == tuple(spec.ignore_keys or ())
    assert config.allow_nonfinite is spec.allow_nonfinite
    assert config.source_digest == spec.source_digest
    assert config.pipeline_layout == spec.parallelism.to_layout()
    if spec.layouts is not None:
        assert config.layouts.source_tensor_parallel == spec.layouts.source_tensor_parallel
    assert config.ckpt_format == spec.output.format
    assert config.moe.expert_parallel == spec.parallelism.expert
    assert config.moe.expert_tensor_parallel == spec.parallelism.expert_tensor
    moe = spec.moe.model_dump() if spec.moe is not None else {"grouped_gemm": False}
    assert {k: getattr(config.moe, k) for k in moe} == moe
    assert config.src_strategy == (None if spec.source.strategy is None
                                   else Path(f"/mnt/source/{spec.source.strategy}"))
    assert config.src_ckpt_suffix == spec.source.ckpt_suffix


def test_config_map_is_mounted_read_only_and_named_by_config(settings: OperatorSettings) -> None:
    job: Any = render_job(conversion(CASES["facts"]), settings)
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["model-config"]["configMap"] == {
        "name": "qwen2-yaml", "optional": False, "items": [{"key": "finetune_qwen2_7b.yaml", "path": "model.yaml"}]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/etc/ms2mg/model-config"] == {"name": "model-config", "mountPath": "/etc/ms2mg/model-config",
                                                 "readOnly": True}
    config = to_config(converter_parser().parse_args(container["args"]))
    assert str(config.config_yaml) == "/etc/ms2mg/model-config/model.yaml"


def test_config_path_lies_on_the_source_volume(settings: OperatorSettings) -> None:
    body = make_body(spec_with(config={"path": "llama2-7b/run_llama2_7b.yaml"}))
    job: Any = render_job(conversion(body), settings)
    container = job["spec"]["template"]["spec"]["containers"][0]
    config = to_config(converter_parser().parse_args(container["args"]))
    assert str(config.config_yaml) == "/mnt/source/llama2-7b/run_llama2_7b.yaml"
    assert all("configMap" not in v for v in job["spec"]["template"]["spec"]["volumes"])


def test_pod_is_locked_down(settings: OperatorSettings) -> None:
    job: Any = render_job(conversion(CASES["minimal"]), settings)
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["restartPolicy"] == "Never"
    assert pod["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == settings.converter_service_account
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert container["terminationMessagePolicy"] == "File"
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/mnt/source"]["readOnly"] is True
    assert not mounts["/mnt/destination"].get("readOnly")
    assert "/tmp" in mounts
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["source"]["persistentVolumeClaim"] == {"claimName": "mindformers", "readOnly": True}
    assert volumes["tmp"]["emptyDir"]["sizeLimit"] == settings.tmp_size_limit
    assert all("valueFrom" not in e for e in container["env"])


def test_same_claim_is_one_volume_mounted_twice(settings: OperatorSettings) -> None:
    pod: Any = render_job(conversion(CASES["same-pvc"]), settings)["spec"]["template"]["spec"]  # type: ignore[index]
    claims = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert len(claims) == 1
    mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["/mnt/source"]["name"] == mounts["/mnt/destination"]["name"] == claims[0]["name"]
    assert mounts["/mnt/source"]["readOnly"] is True


def test_pod_failure_policy(settings: OperatorSettings) -> None:
    spec: Any = render_job(conversion(CASES["minimal"]), settings)["spec"]
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}
    assert rules[1]["action"] == "FailJob"
    assert rules[1]["onExitCodes"]["values"] == sorted(int(c) for c in DETERMINISTIC_EXIT_CODES)
    assert rules[1]["onExitCodes"]["containerName"] == "convert"


def test_job_settings_default_from_operator(settings: OperatorSettings) -> None:
    spec: Any = render_job(conversion(CASES["minimal"]), settings)["spec"]
    assert spec["backoffLimit"] == settings.default_backoff_limit
    assert spec["ttlSecondsAfterFinished"] == settings.default_ttl_seconds_after_finished
    assert "activeDeadlineSeconds" not in spec
    assert "suspend" not in spec
    quiet = settings.model_copy(update={"default_ttl_seconds_after_finished": None,
                                        "default_active_deadline_seconds": 60})
    spec = render_job(conversion(CASES["minimal"]), quiet)["spec"]
    assert "ttlSecondsAfterFinished" not in spec
    assert spec["activeDeadlineSeconds"] == 60


def test_job_settings_from_spec_and_kueue(settings: OperatorSettings) -> None:
    job: Any = render_job(conversion(CASES["full"]), settings)
    assert job["spec"]["backoffLimit"] == 0
    assert job["spec"]["ttlSecondsAfterFinished"] == 600
    assert job["spec"]["activeDeadlineSeconds"] == 7200
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert "kueue.x-k8s.io/queue-name" not in job["spec"]["template"]["metadata"]["labels"]


def test_owner_reference_and_labels(settings: OperatorSettings) -> None:
    job: Any = render_job(conversion(CASES["full"]), settings)
    owner = job["metadata"]["ownerReferences"][0]
    assert owner == {"apiVersion": "ms2mg.io/v1alpha1", "kind": "CheckpointConversion", "name": "llama",
                     "uid": CASES["full"]["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert labels["ms2mg.io/conversion-uid"] == CASES["full"]["metadata"]["uid"]
    assert labels["ms2mg.io/generation"] == "3"
    assert labels["app.kubernetes.io/managed-by"] == "ms2mg-operator"
    assert all(LABEL_VALUE.match(v) and len(v) <= 63 for v in labels.values())


@pytest.mark.parametrize("name", ["llama", "a" * 253, "x.y.z", "0-start", "a" * 60 + ".b"])
def test_job_name_is_deterministic_and_valid(name: str) -> None:
    meta = ObjectMeta(name=name, namespace="ml", uid="u1", generation=12)
    first = job_name(meta)
    assert first == job_name(meta)
    assert len(first) <= 63 and DNS1123_LABEL.match(first), first
    assert job_name(meta.model_copy(update={"generation": 13})) != first
    assert job_name(meta.model_copy(update={"uid": "u2"})) != first


@pytest.mark.parametrize("text", ["a" * 64, "a.b" * 40, "-leading", "x" * 63, "ok"])
def test_label_value(text: str) -> None:
    value = label_value(text)
    assert len(value) <= 63 and LABEL_VALUE.match(value)
    assert value == text or len(text) > 63 or not LABEL_VALUE.match(text)


@pytest.mark.parametrize("relative", ["../x", "a/../../x", "/etc", ".."])
def test_mounted_path_never_leaves_the_mount(relative: str) -> None:
    with pytest.raises(ValueError, match="leaves the volume"):
        mounted_path("/mnt/source", relative)
