"""KubeClient over HTTP against kmock: the calls it makes and how API errors are classified."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import kmock as km
import pytest
from kubernetes import client

from ms2mg_operator.crdgen import build_crd
from ms2mg_operator.kube import (
    ConflictError,
    JobOwnershipError,
    KubeClient,
    NotFoundError,
    PermanentApiError,
    TransientApiError,
)
from tests.operator.conftest import make_body
from tests.operator.kmock_shim import StampingEmulator, register_crd

pytestmark = [pytest.mark.kmock(cls=StampingEmulator),
              pytest.mark.filterwarnings("ignore:read_binary is deprecated:DeprecationWarning")]

CONVERSIONS = "/apis/ms2mg.io/v1alpha1/namespaces/ml/checkpointconversions"


def new_client(url: str) -> KubeClient:
    return KubeClient.for_configuration(client.Configuration(host=url.rstrip("/")), timeout=5, retry_delay=7)


@pytest.fixture
async def api(kmock: km.KubernetesEmulator) -> KubeClient:
    kmock.resources.load_bundled()
    register_crd(kmock, build_crd())
    return new_client(str(kmock.url))


def job(name: str = "j1", owner: str = "uid-1") -> dict[str, Any]:
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": name, "namespace": "ml", "labels": {"ms2mg.io/conversion-uid": owner},
                         "ownerReferences": [{"apiVersion": "ms2mg.io/v1alpha1", "kind": "CheckpointConversion",
                                              "name": "llama", "uid": owner, "controller": True}]},
            "spec": {"template": {"spec": {"containers": []}}}}


async def test_conversions(api: KubeClient) -> None:
    body = make_body()
    await asyncio.to_thread(api._call, "POST", CONVERSIONS, body=body)
    got = await asyncio.to_thread(api.get_conversion, "ml", "llama")
    assert got is not None and got["spec"] == body["spec"]
    assert [c["metadata"]["name"] for c in await asyncio.to_thread(api.list_conversions, "ml")] == ["llama"]
    assert await asyncio.to_thread(api.patch_conversion_status, "ml", "llama", {"progress": "1/2", "result": {}})
    assert await asyncio.to_thread(api.patch_conversion_status, "ml", "llama", {"progress": "2/2", "result": None})
    got = await asyncio.to_thread(api.get_conversion, "ml", "llama")
    assert got is not None and got["status"] == {"progress": "2/2"}
    assert await asyncio.to_thread(api.get_conversion, "ml", "missing") is None
    assert not await asyncio.to_thread(api.patch_conversion_status, "ml", "missing", {})


async def test_create_or_adopt(api: KubeClient) -> None:
    created, adopted = await asyncio.to_thread(api.create_or_adopt_job, job(), "uid-1")
    assert created["metadata"]["name"] == "j1" and not adopted
    again, adopted = await asyncio.to_thread(api.create_or_adopt_job, job(), "uid-1")
    assert adopted and again["metadata"]["uid"] == created["metadata"]["uid"]
    with pytest.raises(JobOwnershipError, match="not controlled"):
        await asyncio.to_thread(api.create_or_adopt_job, job(), "uid-2")
    listed = await asyncio.to_thread(api.list_jobs, "ml", "ms2mg.io/conversion-uid", "uid-1")
    assert [j["metadata"]["name"] for j in listed] == ["j1"]
    assert await asyncio.to_thread(api.list_jobs, "ml", "ms2mg.io/conversion-uid", "uid-9") == []
    await asyncio.to_thread(api.delete_job, "ml", "j1")
    await asyncio.to_thread(api.delete_job, "ml", "j1")  # already gone: fine
    assert await asyncio.to_thread(api.get_job, "ml", "j1") is None


async def test_pvcs_events_and_logs(api: KubeClient, kmock: km.KubernetesEmulator) -> None:
    kmock.objects["v1/persistentvolumeclaims", "ml", "data"] = {"metadata": {"name": "data", "namespace": "ml"}}
    assert await asyncio.to_thread(api.pvc_exists, "ml", "data")
    assert not await asyncio.to_thread(api.pvc_exists, "ml", "nope")
    involved = {"apiVersion": "ms2mg.io/v1alpha1", "kind": "CheckpointConversion", "name": "llama",
                "namespace": "ml", "uid": "u"}
    await asyncio.to_thread(api.emit_event, involved, "Warning", "InvalidSpec", "bad path")
    await asyncio.to_thread(api.emit_event, involved, "Warning", "InvalidSpec", "bad path")
    posted = kmock["post", km.resource("v1/events")]
    assert len(posted) == 2
    assert posted[0].data["involvedObject"]["name"] == "llama"
    assert posted[0].data["reason"] == "InvalidSpec"
    kmock["get", km.resource("v1/pods"), km.name("p1"), km.subresource("log")] << b'{"done": 1}\n'
    tail = await asyncio.to_thread(api.read_log_tail, "ml", "p1", "convert", 5)
    assert tail == '{"done": 1}\n'
    log_request = kmock["get", km.subresource("log")][0]
    assert log_request.params["tailLines"] == "5" and log_request.params["container"] == "convert"
    kmock["get", km.resource("v1/pods"), km.name("p2"), km.subresource("log")] << 400
    assert await asyncio.to_thread(api.read_log_tail, "ml", "p2", "convert", 5) is None


@pytest.mark.parametrize(("status", "error"), [
    (500, TransientApiError), (503, TransientApiError), (429, TransientApiError), (403, TransientApiError),
    (401, TransientApiError), (400, PermanentApiError), (422, PermanentApiError), (404, NotFoundError),
    (409, ConflictError),
])
async def test_error_classification(api: KubeClient, kmock: km.KubernetesEmulator, status: int,
                                    error: type[Exception]) -> None:
    kmock["get", km.resource("batch/v1/jobs")] << status << {"kind": "Status", "message": f"boom {status}"}
    with pytest.raises(error, match=f"boom {status}") as info:
        await asyncio.to_thread(api._json, "GET", "/apis/batch/v1/namespaces/ml/jobs/x")
    if isinstance(info.value, TransientApiError):
        assert info.value.delay == 7


async def test_retry_after_header(api: KubeClient, kmock: km.KubernetesEmulator) -> None:
    kmock["get", km.resource("batch/v1/jobs")] << 429 << {"Retry-After": "3"} << {"message": "slow down"}
    with pytest.raises(TransientApiError) as info:
        await asyncio.to_thread(api.get_job, "ml", "x")
    assert info.value.delay == 3


async def test_unreachable_server_is_transient() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    api = new_client(f"http://127.0.0.1:{port}")
    with pytest.raises(TransientApiError):
        await asyncio.to_thread(api.get_job, "ml", "x")
