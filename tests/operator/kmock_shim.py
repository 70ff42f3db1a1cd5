"""A kmock 0.8 `KubernetesEmulator` that behaves enough like an API server for kopf (pin kmock==0.8).

kmock 0.8 out of the box breaks kopf in four ways (see the shared k8s-test-infrastructure notes, §2 and
Appendix A). This subclass fixes them:
1. objects get `metadata.uid/resourceVersion/creationTimestamp/generation` (kopf's JSON-patches `test` the
   resourceVersion), and every update bumps the resourceVersion (and the generation on spec changes);
2. a failed JSON-patch `test` answers 422, as a real server does (kmock: 500);
3. watches subscribe to the event bus *before* replaying the snapshot (kmock loses events in between) and
   honour `?resourceVersion=`;
4. lists carry `apiVersion`/`kind` and a resourceVersion.
It also adds `refusals` (fault injection that refuses a request before it is applied).
It touches kmock's private names (`_handle`, `_buses`, `_lock`, name-mangled helpers): hence the pin.
"""

from __future__ import annotations

import datetime
import itertools
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import jsonpatch
import kmock


def register_crd(emulator: kmock.KubernetesEmulator, crd: Mapping[str, Any]) -> None:
    """Serve a CRD's resource (kmock does not derive resources from CRD objects)."""
    names = crd["spec"]["names"]
    for version in crd["spec"]["versions"]:
        emulator.resources[f"{crd['spec']['group']}/{version['name']}/{names['plural']}"] = {
            "kind": names["kind"],
            "singular": names["singular"],
            "shortnames": set(names.get("shortNames", [])),
            "namespaced": crd["spec"]["scope"] == "Namespaced",
            "verbs": {"create", "delete", "get", "list", "patch", "update", "watch"},
            "subresources": set(version.get("subresources", {})),
        }


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class StampingEmulator(kmock.KubernetesEmulator):
    """kmock's emulator with the four fixes above."""

    _rv = itertools.count(1000)

    def _stamp(self, request: Any) -> None:
        data = request.data
        if request.action == kmock.action.CREATE and isinstance(data, dict):
            meta = data.setdefault("metadata", {})
            meta.setdefault("uid", str(uuid.uuid4()))
            meta["resourceVersion"] = str(next(self._rv))
            meta.setdefault("creationTimestamp", _now())
            meta.setdefault("generation", 1)
            if request.namespace and "namespace" not in meta:
                meta["namespace"] = request.namespace
        elif request.action == kmock.action.UPDATE:
            rv = str(next(self._rv))
            if isinstance(data, dict):
                data.setdefault("metadata", {})["resourceVersion"] = rv
                if "spec" in data and request.name is not None:
                    self._bump_generation(request, data)
            elif isinstance(data, list):  # JSON-patch: kopf's `test` op first, then the bump
                data.append({"op": "add", "path": "/metadata/resourceVersion", "value": rv})

    def _bump_generation(self, request: Any, data: dict[str, Any]) -> None:
        key = (request.resource, request.namespace, request.name)
        try:
            current = self.objects[key].get("metadata", {}).get("generation", 1)
        except (KeyError, ValueError):
            return
        data["metadata"]["generation"] = int(current) + 1

    refusals: list[Callable[[Any], int | None]]
    """Checked before kmock applies a request: a returned status code refuses it *unapplied* (kmock's own
    reactions answer after the change was applied, like a server that fails after committing)."""

    async def _handle(self, request: Any) -> Any:
        for refuse in getattr(self, "refusals", ()):
            code = refuse(request)
            if code:
                raise kmock.KubernetesError(status=code, reason="Injected",
                                            message=f"injected {code} (not applied)")
        if request.resource is not None:
            self._stamp(request)
        try:
            return await super()._handle(request)
        except jsonpatch.JsonPatchTestFailed as e:  # a real server: 422; kmock 0.8: 500
            raise kmock.KubernetesError(status=422, reason="Invalid", message=str(e)) from e

    async def _serve_list(self, request: Any) -> Any:
        result = await super()._serve_list(request)
        result["metadata"]["resourceVersion"] = str(next(self._rv))
        res = request.resource
        info = self.resources.get(res)
        result["apiVersion"] = f"{res.group}/{res.version}" if res.group else res.version
        result["kind"] = f"{info.kind}List" if info is not None and info.kind else "List"
        return result

    async def _serve_watch(self, request: Any) -> AsyncIterator[Any]:
        yield b""
        bus = self._buses[request.resource]
        since_rv = request.params.get("resourceVersion", "")
        async with self._lock:
            mark = await bus.mark()
            objs = self._KubernetesEmulator__get_objs(request, strict=False)  # type: ignore[attr-defined]
            events = [{"type": "ADDED", "object": o.raw} for o in objs if not o.deleted]
        if since_rv.isdigit():
            events = [e for e in events
                      if int(e["object"].get("metadata", {}).get("resourceVersion", "0")) > int(since_rv)]
        try:
            for event in events:
                yield event
            async for event in bus.stream(since=mark):
                meta = event.get("object", {}).get("metadata", {})
                check = self._KubernetesEmulator__check  # type: ignore[attr-defined]
                if check(request, request.resource, meta.get("namespace"), meta.get("name"), strict=False):
                    yield event
        finally:
            await bus.unmark(mark)
