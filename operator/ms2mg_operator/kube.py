"""The only module that calls the Kubernetes API.

It uses the official `kubernetes` client for configuration, authentication (kubeconfig or in-cluster, token
refresh included) and connection pooling, but sends plain JSON to the stable REST paths instead of the
generated typed methods: those coerce bodies through the client's own models (silently dropping fields the
client version does not know, such as newer Job fields) and deserialise responses into models; raw dicts keep
the rendered manifests exact and need no conversion. Calls are synchronous: the kopf handlers that use them
are sync functions, which kopf runs in its thread pool.

Errors are mapped in one place (`_error`): server errors, 429, timeouts and connection failures become
`TransientApiError` (retry later, after `Retry-After` when given); 401/403 are transient too (credentials
rotate, RBAC gets fixed); other 4xx become `PermanentApiError` (`NotFoundError`, `ConflictError`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import cast
from urllib.parse import quote

import urllib3
from kubernetes import client, config

from ms2mg_operator.api.v1alpha1 import GROUP, PLURAL, VERSION
from ms2mg_operator.keys import MANAGED_BY

logger = logging.getLogger(__name__)

Obj = dict[str, object]
COMPONENT = MANAGED_BY


class ApiError(Exception):
    """A failed API call; `str(err)` is the server's message."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class TransientApiError(ApiError):
    """Worth retrying after `delay` seconds."""

    def __init__(self, message: str, status: int = 0, delay: float = 10.0) -> None:
        super().__init__(message, status)
        self.delay = delay


class PermanentApiError(ApiError):
    """The request itself is wrong; retrying the same request cannot help."""


class NotFoundError(PermanentApiError):
    pass


class ConflictError(PermanentApiError):
    pass


class JobOwnershipError(PermanentApiError):
    """A Job with the expected name exists but is not controlled by this resource."""


def _server_message(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return body.decode(errors="replace")[:500]
    message = data.get("message") if isinstance(data, dict) else None
    return str(message) if message else body.decode(errors="replace")[:500]


def _retry_after(headers: Mapping[str, str], default: float) -> float:
    try:
        return max(1.0, float(headers.get("Retry-After", "")))
    except ValueError:
        return default


class KubeClient:
    """Typed access to the few API operations the operator needs (see docs/operator.md, RBAC)."""

    def __init__(self, api: client.ApiClient, *, timeout: float = 30.0, retry_delay: float = 30.0) -> None:
        self._api = api
        self._timeout = timeout
        self._retry_delay = retry_delay

    @classmethod
    def for_configuration(cls, cfg: client.Configuration, *, timeout: float = 30.0,
                          retry_delay: float = 30.0) -> KubeClient:
        """A client for `cfg`. urllib3 may retry a failed connection, but never sleeps on 429/503 itself:
        those come back at once as `TransientApiError`, and kopf retries the handler after the delay."""
        cfg.retries = urllib3.Retry(total=2, read=0, status=0, redirect=0, respect_retry_after_header=False)
        return cls(client.ApiClient(cfg), timeout=timeout, retry_delay=retry_delay)

    @classmethod
    def from_environment(cls, *, timeout: float = 30.0, retry_delay: float = 30.0) -> KubeClient:
        """In-cluster configuration when running in a pod, else the current kubeconfig context."""
        cfg = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
        except config.ConfigException:
            config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=os.environ.get("KUBECONFIG"), client_configuration=cfg)
        return cls.for_configuration(cfg, timeout=timeout, retry_delay=retry_delay)

    def close(self) -> None:
        self._api.close()  # type: ignore[no-untyped-call]

    def _error(self, status: int, body: bytes, headers: Mapping[str, str], what: str) -> ApiError:
        message = f"{what}: {_server_message(body)}"
        if status >= 500 or status in (401, 403, 408, 429):
            return TransientApiError(message, status, _retry_after(headers, self._retry_delay))
        if status == 404:
            return NotFoundError(message, status)
        if status == 409:
            return ConflictError(message, status)
        return PermanentApiError(message, status)

    def _call(self, method: str, path: str, *, body: object = None,
              query: list[tuple[str, str]] | None = None, content_type: str = "application/json") -> bytes:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        what = f"{method} {path}"
        _, url, headers, body, _ = self._api.param_serialize(
            method=method, resource_path=path, query_params=query or [], header_params=headers, body=body,
            auth_settings=["BearerToken"])
        try:
            response = self._api.call_api(method, url, header_params=headers, body=body,
                                          _request_timeout=self._timeout)
            data = cast(bytes, response.read())  # type: ignore[no-untyped-call]
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise TransientApiError(f"{what}: {e}", delay=self._retry_delay) from e
        if not 200 <= response.status < 300:
            raise self._error(response.status, data, response.headers, what)
        return data

    def _json(self, method: str, path: str, *, body: object = None,
              query: list[tuple[str, str]] | None = None) -> Obj:
        data = json.loads(self._call(method, path, body=body, query=query))
        return data if isinstance(data, dict) else {}

    @staticmethod
    def _ns(namespace: str) -> str:
        return quote(namespace, safe="")

    def _conversions(self, namespace: str) -> str:
        return f"/apis/{GROUP}/{VERSION}/namespaces/{self._ns(namespace)}/{PLURAL}"

    def _jobs(self, namespace: str) -> str:
        return f"/apis/batch/v1/namespaces/{self._ns(namespace)}/jobs"

    # --- CheckpointConversions -----------------------------------------------------------------

    def get_conversion(self, namespace: str, name: str) -> Obj | None:
        try:
            return self._json("GET", f"{self._conversions(namespace)}/{quote(name)}")
        except NotFoundError:
            return None

    def list_conversions(self, namespace: str) -> list[Obj]:
        items = self._json("GET", self._conversions(namespace)).get("items")
        return [i for i in items if isinstance(i, dict)] if isinstance(items, list) else []

    def patch_conversion_status(self, namespace: str, name: str, status: Obj) -> bool:
        """Merge-patch `.status` (explicit nulls delete stale fields). False when the resource is gone."""
        try:
            self._call("PATCH", f"{self._conversions(namespace)}/{quote(name)}/status",
                       body={"status": status}, content_type="application/merge-patch+json")
        except NotFoundError:
            return False
        except ConflictError as e:  # the server gave up after its own conflict retries: not applied, retry
            raise TransientApiError(str(e), e.status, delay=min(self._retry_delay, 5.0)) from e
        return True

    # --- Jobs ----------------------------------------------------------------------------------

    def get_job(self, namespace: str, name: str) -> Obj | None:
        try:
            return self._json("GET", f"{self._jobs(namespace)}/{quote(name)}")
        except NotFoundError:
            return None

    def list_jobs(self, namespace: str, label: str, value: str) -> list[Obj]:
        """Jobs with `label=value` (also filtered here, in case a server ignores the selector)."""
        selector = [("labelSelector", f"{label}={value}")]
        items = self._json("GET", self._jobs(namespace), query=selector).get("items")
        jobs = [i for i in items if isinstance(i, dict)] if isinstance(items, list) else []
        return [j for j in jobs if _labels(j).get(label) == value]

    def create_or_adopt_job(self, job: Obj, owner_uid: str) -> tuple[Obj, bool]:
        """Create the Job; on 409 return the existing one if `owner_uid` controls it. (job, adopted)."""
        meta = cast(Mapping[str, object], job["metadata"])
        namespace, name = str(meta["namespace"]), str(meta["name"])
        try:
            return self._json("POST", self._jobs(namespace), body=job), False
        except ConflictError:
            existing = self.get_job(namespace, name)
        if existing is None:
            raise TransientApiError(f"Job {name} exists but vanished before it could be read",
                                    delay=min(self._retry_delay, 5.0))
        if any(ref.get("uid") == owner_uid and ref.get("controller") is True for ref in _owners(existing)):
            return existing, True
        raise JobOwnershipError(f"Job {namespace}/{name} already exists and is not controlled by this "
                                f"CheckpointConversion (uid {owner_uid}); delete or rename it", 409)

    def delete_job(self, namespace: str, name: str) -> None:
        """Delete a Job in the foreground: it stays (with a deletionTimestamp) until the garbage collector has
        deleted its pods and they are gone, so its disappearance means no pod of it runs any more. A Job
        already gone is fine."""
        options = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Foreground"}
        with contextlib.suppress(NotFoundError):
            self._call("DELETE", f"{self._jobs(namespace)}/{quote(name)}", body=options)

    # --- PVCs, pods, events --------------------------------------------------------------------

    def pvc_exists(self, namespace: str, name: str) -> bool:
        path = f"/api/v1/namespaces/{self._ns(namespace)}/persistentvolumeclaims/{quote(name)}"
        try:
            self._call("GET", path)
        except NotFoundError:
            return False
        return True

    def list_pods(self, namespace: str, label: str, value: str) -> list[Obj]:
        """Pods with `label=value` (also filtered here, in case a server ignores the selector)."""
        selector = [("labelSelector", f"{label}={value}")]
        items = self._json("GET", f"/api/v1/namespaces/{self._ns(namespace)}/pods", query=selector).get("items")
        pods = [i for i in items if isinstance(i, dict)] if isinstance(items, list) else []
        return [p for p in pods if _labels(p).get(label) == value]

    def read_log_tail(self, namespace: str, pod: str, container: str, lines: int) -> str | None:
        """The last `lines` lines of a container's log; None when there is no log (yet)."""
        path = f"/api/v1/namespaces/{self._ns(namespace)}/pods/{quote(pod)}/log"
        query = [("container", container), ("tailLines", str(lines))]
        try:
            return self._call("GET", path, query=query).decode(errors="replace")
        except PermanentApiError:  # 400 while the container is starting, 404 when the pod is gone
            return None

    def emit_event(self, involved: Mapping[str, object], event_type: str, reason: str, message: str) -> None:
        """Post a core/v1 Event about `involved` (apiVersion, kind, name, namespace, uid). Best effort."""
        namespace = str(involved.get("namespace", "default"))
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{involved.get('name', 'ms2mg')}.{time.time_ns():x}", "namespace": namespace},
            "involvedObject": dict(involved), "type": event_type, "reason": reason, "message": message[:1024],
            "source": {"component": COMPONENT}, "reportingComponent": COMPONENT,
            "reportingInstance": os.environ.get("HOSTNAME", COMPONENT),
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        }
        try:
            self._call("POST", f"/api/v1/namespaces/{self._ns(namespace)}/events", body=event)
        except ApiError as e:
            logger.warning("Could not post event %s for %s: %s", reason, involved.get("name"), e)


def _labels(obj: Mapping[str, object]) -> Mapping[str, object]:
    meta = obj.get("metadata")
    labels = meta.get("labels") if isinstance(meta, Mapping) else None
    return labels if isinstance(labels, Mapping) else {}


def _owners(obj: Mapping[str, object]) -> list[Mapping[str, object]]:
    meta = obj.get("metadata")
    refs = meta.get("ownerReferences") if isinstance(meta, Mapping) else None
    return [r for r in refs if isinstance(r, Mapping)] if isinstance(refs, list) else []
