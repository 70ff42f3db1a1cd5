"""The v1alpha1 models accept what the issue describes and reject unsafe or malformed input."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from pydantic import ValidationError

from ms2mg_converter.config import ModelOverrides
from ms2mg_operator.api.v1alpha1 import CheckpointConversionSpec, CheckpointConversionStatus, ConditionType
from tests.operator.conftest import SPEC


def spec_with(**changes: Any) -> dict[str, Any]:
    """SPEC with dotted-path changes, e.g. spec_with(**{"source.path": "/abs"})."""
    spec = copy.deepcopy(SPEC)
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        node = spec
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return spec


ACCEPTED = [
    pytest.param(SPEC, id="minimal"),
    pytest.param(spec_with(**{"source.path": "model.safetensors"}), id="single-file"),
    pytest.param(spec_with(**{"source.path": "a/b.c/..d/e..", "destination.path": "x/.hidden"}),
                 id="dots-inside-names"),
    pytest.param(spec_with(**{"destination.pvc": "mindformers", "destination.path": "out"}),
                 id="same-pvc-disjoint-paths"),
    pytest.param(spec_with(**{"destination.pvc": "mindformers", "destination.path": "llama2-7b-out"}),
                 id="same-pvc-prefix-but-not-parent"),
    pytest.param(spec_with(model={"numLayers": 32, "hiddenSize": 4096, "numAttentionHeads": 32,
                                  "numQueryGroups": 8, "swiglu": True, "normalization": "RMSNorm",
                                  "positionEmbeddingType": "rope", "untieEmbeddingsAndOutputWeights": True,
                                  "seqLength": 4096, "qkLayernorm": False}), id="model-overrides"),
    pytest.param(spec_with(vocab={"trueSize": 32000, "makeDivisibleBy": 64, "padFill": "zero"},
                           dtype="fp32", transformerImpl="transformer_engine",
                           layouts={"qkv": "contiguous", "fc1": "interleaved"}), id="vocab-layouts"),
    pytest.param(spec_with(image="registry.example/ms2mg:1", resources={"limits": {"memory": "64Gi"}},
                           nodeSelector={"pool": "cpu"}, tolerations=[{"key": "k", "operator": "Exists"}],
                           affinity={"nodeAffinity": {}}, imagePullSecrets=[{"name": "regcred"}],
                           serviceAccountName="sa", priorityClassName="low", queueName="team-a",
                           backoffLimit=0, activeDeadlineSeconds=3600, ttlSecondsAfterFinished=0),
                 id="pod-settings"),
    pytest.param(spec_with(config={"configMap": {"name": "qwen2-yaml", "key": "finetune_qwen2_7b.yaml"}},
                           model={"rotaryBase": 1000000.0, "normEpsilon": 1e-6, "rotaryPercent": 0.5,
                                  "rotaryInterleaved": True, "maxPositionEmbeddings": 32768},
                           layouts={"qkv": "contiguous", "sourceTensorParallel": 4}, sourceDigest="sha256"),
                 id="model-facts-configmap"),
    pytest.param(spec_with(config={"path": "llama2-7b/run_llama2_7b.yaml"},
                           parallelism={"tensor": 2, "pipeline": 4, "decoderFirstPipelineNumLayers": 6,
                                        "decoderLastPipelineNumLayers": 6}), id="config-path-uneven-pp"),
    pytest.param(spec_with(parallelism={"pipeline": 2, "numLayersPerVirtualPipelineStage": 2}), id="vpp"),
    pytest.param(spec_with(output={"format": "torch_dist"},
                           source={"pvc": "mindformers", "path": "output/checkpoint", "strategy": "output/strategy",
                                   "ckptSuffix": "2_100"}), id="torch-dist-distributed-source"),
    pytest.param(spec_with(parallelism={"tensor": 2, "expert": 4, "expertTensor": 2},
                           moe={"groupedGemm": True, "routerTopk": 8, "routerScoreFunction": "sigmoid",
                                "routerTopkScalingFactor": 2.5, "routerNumGroups": 8, "routerGroupTopk": 4,
                                "routerPreSoftmax": False},
                           model={"numAttentionHeads": 128, "qLoraRank": 1536, "kvLoraRank": 512,
                                  "qkHeadDim": 128, "qkPosEmbHeadDim": 64, "vHeadDim": 128, "ropeType": "yarn",
                                  "rotaryScalingFactor": 40.0, "originalMaxPositionEmbeddings": 4096,
                                  "betaFast": 32.0, "betaSlow": 1.0, "mscale": 1.0, "mscaleAllDim": 1.0}),
                 id="moe-mla"),
]

REJECTED = [
    pytest.param(spec_with(**{"source.path": "/etc/passwd"}), "relative", id="absolute-source"),
    pytest.param(spec_with(**{"destination.path": "/out"}), "relative", id="absolute-destination"),
    pytest.param(spec_with(**{"source.path": "../other-team"}), "'..'", id="dotdot-start"),
    pytest.param(spec_with(**{"destination.path": "a/../../b"}), "'..'", id="dotdot-inside"),
    pytest.param(spec_with(**{"destination.path": "a/.."}), "'..'", id="dotdot-end"),
    pytest.param(spec_with(**{"source.path": "./a"}), "'.'", id="dot-segment"),
    pytest.param(spec_with(**{"source.path": "a//b"}), "empty segments", id="double-slash"),
    pytest.param(spec_with(**{"destination.path": "out/"}), "empty segments", id="trailing-slash"),
    pytest.param(spec_with(**{"source.path": ""}), "at least 1", id="empty-path"),
    pytest.param(spec_with(**{"source.path": "a\nb"}), "control", id="newline"),
    pytest.param(spec_with(**{"source.path": "a" * 1025}), "at most 1024", id="oversized-path"),
    pytest.param(spec_with(**{"source.pvc": "Not_A_Name"}), "pattern", id="bad-pvc-name"),
    pytest.param(spec_with(**{"source.pvc": "a" * 254}), "at most 253", id="oversized-pvc"),
    pytest.param(spec_with(image="x" * 513), "at most 512", id="oversized-image"),
    pytest.param(spec_with(image="img with spaces"), "pattern", id="image-whitespace"),
    pytest.param(spec_with(queueName="q" * 64), "at most 63", id="oversized-queue"),
    pytest.param(spec_with(nodeSelector={"k": "v" * 64}), "at most 63", id="oversized-selector-value"),
    pytest.param(spec_with(tolerations=[{}] * 65), "at most 64", id="too-many-tolerations"),
    pytest.param(spec_with(unknownField=1), "Extra inputs", id="unknown-top-level"),
    pytest.param(spec_with(**{"source.subPath": "x"}), "Extra inputs", id="unknown-nested"),
    pytest.param(spec_with(**{"parallelism.tensor": 0}), "greater than or equal to 1", id="tp-zero"),
    pytest.param(spec_with(dtype="int8"), "bf16", id="bad-dtype"),
    pytest.param(spec_with(layouts={"qkv": "sideways"}), "grouped", id="bad-layout"),
    pytest.param(spec_with(**{"destination.pvc": "mindformers", "destination.path": "llama2-7b"}),
                 "destination must not", id="same-pvc-same-path"),
    pytest.param(spec_with(**{"destination.pvc": "mindformers", "destination.path": "llama2-7b/out"}),
                 "destination must not", id="destination-inside-source"),
    pytest.param(spec_with(**{"source.path": "a/b", "destination.pvc": "mindformers",
                              "destination.path": "a"}), "destination must not", id="source-inside-destination"),
    pytest.param(spec_with(backoffLimit=101), "less than or equal to 100", id="backoff-too-large"),
    pytest.param(spec_with(config={}), "exactly one of configMap or path", id="config-neither"),
    pytest.param(spec_with(config={"path": "a.yaml", "configMap": {"name": "c", "key": "k"}}),
                 "exactly one of configMap or path", id="config-both"),
    pytest.param(spec_with(config={"path": "../other/a.yaml"}), "'..'", id="config-path-escapes"),
    pytest.param(spec_with(config={"configMap": {"name": "c", "key": "a/b"}}), "pattern", id="config-key-slash"),
    pytest.param(spec_with(model={"rotaryBase": 0}), "greater than 0", id="rotary-base-zero"),
    pytest.param(spec_with(model={"rotaryPercent": 1.5}), "less than or equal to 1", id="rotary-percent-above-1"),
    pytest.param(spec_with(layouts={"sourceTensorParallel": 0}), "greater than or equal to 1", id="source-tp-zero"),
    pytest.param(spec_with(output={"format": "zarr"}), "Input should be", id="unknown-format"),
    pytest.param(spec_with(parallelism={"expert": 0}), "greater than or equal to 1", id="ep-zero"),
    pytest.param(spec_with(moe={"routerScoreFunction": "relu"}), "Input should be", id="moe-score-function"),
    pytest.param(spec_with(moe={"routerTopk": 0}), "greater than or equal to 1", id="moe-topk-zero"),
    pytest.param(spec_with(model={"ropeType": "ntk"}), "Input should be", id="rope-type"),
    pytest.param(spec_with(**{"source.strategy": "../strategy"}), "'..'", id="strategy-escapes"),
    pytest.param(spec_with(**{"source.ckptSuffix": "2_100/../x"}), "String should match", id="suffix-path"),
    pytest.param(spec_with(sourceDigest="md5"), "crc32", id="bad-digest"),
]


@pytest.mark.parametrize("spec", ACCEPTED)
def test_accepts(spec: dict[str, Any]) -> None:
    parsed = CheckpointConversionSpec.model_validate(spec)
    again = CheckpointConversionSpec.model_validate(parsed.model_dump(by_alias=True, exclude_none=True))
    assert again == parsed


@pytest.mark.parametrize(("spec", "message"), REJECTED)
def test_rejects(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        CheckpointConversionSpec.model_validate(spec)


def test_missing_source_is_rejected() -> None:
    spec = copy.deepcopy(SPEC)
    del spec["source"]
    with pytest.raises(ValidationError, match="source"):
        CheckpointConversionSpec.model_validate(spec)


def test_defaults() -> None:
    spec = CheckpointConversionSpec.model_validate({"source": SPEC["source"], "destination": SPEC["destination"]})
    assert (spec.parallelism.tensor, spec.parallelism.pipeline) == (1, 1)
    assert spec.verify is True
    assert spec.overwrite is False
    assert spec.vocab.make_divisible_by == 128
    assert spec.dtype.value == "bf16"


def test_model_overrides_match_the_converter() -> None:
    spec = CheckpointConversionSpec.model_validate(spec_with(model={"numLayers": 4, "kvChannels": 64,
                                                                    "qkvBias": True}))
    assert spec.model is not None
    assert spec.model.to_overrides() == ModelOverrides(num_layers=4, kv_channels=64, qkv_bias=True)


def test_every_model_field_is_a_converter_override() -> None:
    from ms2mg_operator.api.v1alpha1 import ModelSpec

    assert set(ModelSpec.model_fields) <= set(ModelOverrides.model_fields)


def test_status_reads_leniently() -> None:
    status = CheckpointConversionStatus.model_validate({
        "observedGeneration": 2, "futureField": 1,
        "conditions": [{"type": "Accepted", "status": "True", "reason": "JobCreated",
                        "lastTransitionTime": "2026-11-27T10:00:00Z", "observedGeneration": 2}],
    })
    accepted = status.condition(ConditionType.ACCEPTED)
    assert accepted is not None and accepted.reason == "JobCreated"
