"""Run the real operator (kopf, in-process) against kmock, and play the Job controller and kubelet.

kmock runs in the test's event loop; the operator's sync handlers call it from kopf's thread pool, and the
test's own API calls go through `asyncio.to_thread` for the same reason (never block the loop).
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import kmock as km
import kopf
from kubernetes import client

from ms2mg_operator.config import OperatorSettings
from ms2mg_operator.handlers import KUBE_KEY, SETTINGS_KEY, register_handlers
from ms2mg_operator.kube import KubeClient, NotFoundError

Obj = dict[str, Any]
NS = "ml"
CONVERSIONS = f"/apis/ms2mg.io/v1alpha1/namespaces/{NS}/checkpointconversions"
JOBS = f"/apis/batch/v1/namespaces/{NS}/jobs"
PODS = f"/api/v1/namespaces/{NS}/pods"


def matches(request: Any, action: km.action, resource: str, subresource: str | None = None) -> bool:
    """`request` is `action` on `resource` ("group/version/plural" or "version/plural")."""
    res = request.resource
    *group, version, plural = resource.split("/")
    return (request.action == action and res is not None
            and (res.group or "", res.version, res.plural) == ("/".join(group), version, plural)
            and (request.subresource or None) == subresource)


def next_matching(times: int, action: km.action, resource: str,
                  subresource: str | None = None) -> tuple[Callable[[Any], bool], list[Any]]:
    """A predicate true for the next `times` requests that are `action` on `resource`, and the list of the
    requests it was true for."""
    hits: list[Any] = []

    def pick(request: Any) -> bool:
        if len(hits) >= times or not matches(request, action, resource, subresource):
            return False
        hits.append(request)
        return True

    return pick, hits


def fail_times(emulator: km.KubernetesEmulator, times: int, status: int, action: km.action, resource: str,
               subresource: str | None = None) -> list[Any]:
    """Answer the next `times` matching requests with `status` (kmock still applies creates/patches,
    like a server that fails after committing). Returns the list of intercepted requests."""
    pick, hits = next_matching(times, action, resource, subresource)
    emulator[pick] << status << {"kind": "Status", "message": f"injected {status}"}
    return hits


def refuse_times(emulator: km.KubernetesEmulator, times: int, status: int, action: km.action, resource: str,
                 subresource: str | None = None) -> list[Any]:
    """Refuse the next `times` matching requests with `status` *without* applying them (a real 409/500).
    Needs the StampingEmulator of kmock_shim. Returns the list of refused requests."""
    pick, hits = next_matching(times, action, resource, subresource)

    def refuse(request: Any) -> int | None:
        return status if pick(request) else None

    refusals = getattr(emulator, "refusals", None)
    if refusals is None:
        refusals = []
        emulator.refusals = refusals  # type: ignore[attr-defined]
    refusals.append(refuse)
    return hits


@dataclass
class Cluster:
    kmock: km.KubernetesEmulator
    api: KubeClient

    async def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def post(self, path: str, body: Obj) -> Obj:
        return await self.call(self.api._json, "POST", path, body=body)  # type: ignore[no-any-return]

    async def get(self, path: str) -> Obj | None:
        try:
            return await self.call(self.api._json, "GET", path)  # type: ignore[no-any-return]
        except NotFoundError:
            return None

    async def patch(self, path: str, body: Obj) -> None:
        await self.call(self.api._call, "PATCH", path, body=body, content_type="application/merge-patch+json")

    async def delete(self, path: str) -> None:
        await self.call(self.api._call, "DELETE", path)

    async def add_pvcs(self, *names: str) -> None:
        for name in names:
            await self.post(f"/api/v1/namespaces/{NS}/persistentvolumeclaims",
                            {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                             "metadata": {"name": name, "namespace": NS}})

    async def conversion(self, name: str = "llama") -> Obj:
        body = await self.get(f"{CONVERSIONS}/{name}")
        assert body is not None, f"conversion {name} is gone"
        return body

    async def wait(self, predicate: Callable[[Obj], bool], name: str = "llama", timeout: float = 20) -> Obj:
        """Poll the resource until `predicate(body)`; fail with the last body seen."""
        body: Obj | None = None
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            body = await self.get(f"{CONVERSIONS}/{name}")
            if body is not None and predicate(body):
                return body
            await asyncio.sleep(0.1)
        raise AssertionError(f"timed out waiting for {name}; last seen: {body}")

    async def jobs(self) -> list[Obj]:
        listed = await self.get(JOBS)
        return [] if listed is None else list(listed["items"])

    async def wait_jobs(self, count: int, timeout: float = 20) -> list[Obj]:
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            jobs = await self.jobs()
            if len(jobs) == count:
                return jobs
            await asyncio.sleep(0.1)
        raise AssertionError(f"expected {count} Jobs, have {[j['metadata']['name'] for j in await self.jobs()]}")

    async def set_job_status(self, name: str, status: Obj) -> None:
        await self.patch(f"{JOBS}/{name}/status", {"status": status})

    async def run_pod(self, job: Obj, phase: str, state: Obj, pod_name: str | None = None) -> str:
        """Create or update the Job's pod as the Job controller and kubelet would."""
        template = job["spec"]["template"]
        name = pod_name or f"{job['metadata']['name']}-pod"
        status = {"phase": phase, "containerStatuses": [{"name": "convert", "state": state}]}
        if await self.get(f"{PODS}/{name}") is None:
            meta = copy.deepcopy(template["metadata"])
            meta.update(name=name, namespace=NS)
            meta["labels"]["job-name"] = job["metadata"]["name"]
            await self.post(PODS, {"apiVersion": "v1", "kind": "Pod", "metadata": meta,
                                   "spec": template["spec"], "status": status})
        else:
            await self.patch(f"{PODS}/{name}/status", {"status": status})
        return name


def status_conditions(body: Obj) -> list[tuple[str, str, str]]:
    return [(c["type"], c["status"], c["reason"]) for c in body.get("status", {}).get("conditions", [])]


def condition(body: Obj, kind: str) -> Obj | None:
    return next((c for c in body.get("status", {}).get("conditions", []) if c["type"] == kind), None)


def has(kind: str, status: str = "True", reason: str | None = None) -> Callable[[Obj], bool]:
    def check(body: Obj) -> bool:
        cond = condition(body, kind)
        return cond is not None and cond["status"] == status and (reason is None or cond["reason"] == reason)
    return check


def new_client(url: str, settings: OperatorSettings) -> KubeClient:
    return KubeClient.for_configuration(client.Configuration(host=url.rstrip("/")),
                                        timeout=settings.api_timeout_seconds, retry_delay=settings.recheck_seconds)


@asynccontextmanager
async def running_operator(emulator: km.KubernetesEmulator, settings: OperatorSettings) -> AsyncIterator[None]:
    """The operator with a fresh registry, logged in to kmock, until the block exits."""
    url = str(emulator.url).rstrip("/")
    registry = kopf.OperatorRegistry()
    register_handlers(registry)

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=url, insecure=True)

    memo = kopf.Memo({SETTINGS_KEY: settings, KUBE_KEY: new_client(url, settings)})
    ready = asyncio.Event()
    task = asyncio.create_task(kopf.operator(registry=registry, clusterwide=True, standalone=True, memo=memo,
                                             ready_flag=ready))
    await asyncio.wait_for(ready.wait(), 15)
    try:
        yield
    finally:
        # A stop flag would make kopf wait 5 s for "hung" tasks, which here include kmock's own
        # watch-serving tasks (created after the operator started). Cancelling ends them at once.
        task.cancel()
        await asyncio.wait([task], timeout=90)  # a handler thread may sit in an API call with retries
        assert task.done()
