"""kopf wiring: thin typed handlers that call `controller` and translate its errors.

* startup: kopf settings (standalone, progress/diff-base in `ms2mg.io/` annotations so `.status` holds only
  our model, own finalizer name, timeouts, server-side label selectors for Jobs and pods), the API client,
  the /metrics server.
* create / resume / update(spec) of a CheckpointConversion -> `controller.reconcile`.
* indexes of our Jobs and pods (by conversion uid) and `on.event` handlers on them -> `controller.sync`:
  the status follows the Job and pod watch streams, with no per-object polling.
* a timer, only while a conversion is active or waits for a re-check (missing PVC, destination in use):
  it reads the progress line from the pod log (logs have no watch events) and re-runs admission. kopf puts
  its finalizer on a resource only while such a timer runs.

Errors: `TransientApiError` -> `kopf.TemporaryError(delay=...)`; any other `ApiError` -> `kopf.PermanentError`.
Handlers return None: status is written by the controller, never through kopf's handler results.

`register_handlers()` registers everything on a given registry (tests use a fresh one); importing this module
registers on kopf's default registry, which `kopf run -m ms2mg_operator.handlers` uses.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import kopf

from ms2mg_operator.api.v1alpha1 import GROUP, PLURAL, VERSION
from ms2mg_operator.config import OperatorSettings
from ms2mg_operator.controller import Context, Observed, parse_status, reconcile, sync
from ms2mg_operator.jobs import MANAGED_BY
from ms2mg_operator.kube import ApiError, KubeClient, TransientApiError
from ms2mg_operator.metrics import Metrics
from ms2mg_operator.status import awaits_recheck, is_accepted, is_terminal

CONTEXT_KEY = "ms2mg_context"
SETTINGS_KEY = "ms2mg_settings"
"""memo keys: tests (or an embedding program) may preset SETTINGS_KEY and KUBE_KEY before start-up."""
KUBE_KEY = "ms2mg_kube"
CONVERSIONS = (GROUP, VERSION, PLURAL)
JOBS = ("batch/v1", "jobs")
PODS = ("v1", "pods")
MANAGED = {"app.kubernetes.io/managed-by": MANAGED_BY}
POLL_INTERVAL = 15.0
IndexKey = tuple[str, str]
Compact = dict[str, object]
ObjIndex = kopf.Index[IndexKey, Compact]

logger = logging.getLogger(__name__)


def _context(memo: kopf.Memo) -> Context:
    ctx = memo.get(CONTEXT_KEY)
    if not isinstance(ctx, Context):
        raise kopf.PermanentError("the ms2mg operator context is missing (start-up did not run)")
    return ctx


@contextmanager
def _kopf_errors() -> Iterator[None]:
    """The one place where API errors become kopf's retry semantics."""
    try:
        yield
    except TransientApiError as e:
        raise kopf.TemporaryError(str(e), delay=e.delay) from e
    except ApiError as e:
        raise kopf.PermanentError(str(e)) from e


def configure_kopf(settings: kopf.OperatorSettings, ours: OperatorSettings) -> None:
    """kopf's own settings (only ever changed here, at start-up)."""
    prefix = ours.label_prefix
    settings.peering.standalone = True
    settings.persistence.finalizer = f"{prefix}/kopf-finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=prefix)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=prefix, key="last-handled-configuration")
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 210
    settings.watching.client_timeout = 240
    settings.watching.connect_timeout = 30
    settings.networking.request_timeout = 60
    settings.networking.connect_timeout = 30
    selector = f"app.kubernetes.io/managed-by={MANAGED_BY}"
    settings.watching.label_selectors[JOBS] = selector
    settings.watching.label_selectors[PODS] = selector


def on_startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    ours = memo.get(SETTINGS_KEY)
    ours = ours if isinstance(ours, OperatorSettings) else OperatorSettings()
    configure_kopf(settings, ours)
    kube = memo.get(KUBE_KEY)
    if not isinstance(kube, KubeClient):
        kube = KubeClient.from_environment(timeout=ours.api_timeout_seconds, retry_delay=ours.recheck_seconds)
    metrics = Metrics()
    if ours.metrics_port:
        metrics.serve(ours.metrics_port)
    memo[CONTEXT_KEY] = Context(kube=kube, settings=ours, metrics=metrics)


def on_cleanup(memo: kopf.Memo, **_: Any) -> None:
    ctx = memo.get(CONTEXT_KEY)
    if isinstance(ctx, Context):
        ctx.metrics.stop()


def reconcile_conversion(name: str, namespace: str | None, memo: kopf.Memo, **_: Any) -> None:
    with _kopf_errors():
        reconcile(_context(memo), namespace or "", name)


def _uid_label(memo: kopf.Memo) -> str:
    return f"{_context(memo).settings.label_prefix}/conversion-uid"


def index_jobs(body: kopf.Body, namespace: str | None, labels: kopf.Labels, memo: kopf.Memo,
               **_: Any) -> dict[IndexKey, Compact]:
    """Our Jobs by (namespace, conversion uid): only the fields the status needs."""
    uid = labels.get(_uid_label(memo))
    if not uid:
        return {}
    meta = body.get("metadata", {})
    compact: Compact = {
        "metadata": {"name": meta.get("name"), "labels": dict(labels),
                     "ownerReferences": list(meta.get("ownerReferences") or [])},
        "spec": {"suspend": body.get("spec", {}).get("suspend")},
        "status": dict(body.get("status") or {}),
    }
    return {(namespace or "", uid): compact}


def index_pods(body: kopf.Body, namespace: str | None, labels: kopf.Labels, memo: kopf.Memo,
               **_: Any) -> dict[IndexKey, Compact]:
    """Our pods by (namespace, conversion uid): phase and container states."""
    uid = labels.get(_uid_label(memo))
    if not uid:
        return {}
    meta, status = body.get("metadata", {}), body.get("status", {})
    compact: Compact = {
        "metadata": {"name": meta.get("name"), "labels": dict(labels),
                     "annotations": dict(meta.get("annotations") or {}),
                     "creationTimestamp": meta.get("creationTimestamp")},
        "status": {"phase": status.get("phase"),
                   "containerStatuses": list(status.get("containerStatuses") or [])},
    }
    return {(namespace or "", uid): compact}


def _observed(key: IndexKey, jobs: ObjIndex | None, pods: ObjIndex | None,
              deleted_job: str | None = None, deleted_pod: str | None = None) -> Observed:
    job_list = [j for j in (jobs.get(key, ()) if jobs is not None else ()) if _name(j) != deleted_job]
    pod_list = [p for p in (pods.get(key, ()) if pods is not None else ()) if _name(p) != deleted_pod]
    return Observed(jobs=job_list, pods=pod_list, deleted_job=deleted_job)


def _name(obj: Mapping[str, object]) -> object:
    meta = obj.get("metadata")
    return meta.get("name") if isinstance(meta, dict) else None


def _sync_quietly(ctx: Context, namespace: str, name: str, uid: str, observed: Observed) -> None:
    """Event handlers are not retried by kopf: log API errors; the next event or the timer catches up."""
    try:
        sync(ctx, namespace, name, uid, observed)
    except ApiError as e:
        logger.warning("Status of %s/%s not updated (will catch up): %s", namespace, name, e)


def on_job_event(type: str, body: kopf.Body, namespace: str | None, labels: kopf.Labels, memo: kopf.Memo,
                 index_jobs: ObjIndex | None = None, index_pods: ObjIndex | None = None, **_: Any) -> None:
    ctx = _context(memo)
    namespace = namespace or ""
    uid = labels.get(f"{ctx.settings.label_prefix}/conversion-uid")
    owner = next((ref for ref in body.metadata.get("ownerReferences") or []
                  if ref.get("uid") == uid and ref.get("controller")), None)
    if not uid or owner is None:
        return
    name = str(body.metadata.get("name"))
    deleted = name if type == "DELETED" else None
    observed = _observed((namespace, uid), index_jobs, index_pods, deleted_job=deleted)
    if deleted is None:  # the event's body is the freshest view of this Job
        observed = Observed(jobs=[*(j for j in observed.jobs if _name(j) != name), dict(body)],
                            pods=observed.pods)
    _sync_quietly(ctx, namespace, str(owner.get("name")), uid, observed)


def on_pod_event(type: str, body: kopf.Body, namespace: str | None, labels: kopf.Labels, memo: kopf.Memo,
                 index_jobs: ObjIndex | None = None, index_pods: ObjIndex | None = None, **_: Any) -> None:
    ctx = _context(memo)
    namespace = namespace or ""
    prefix = ctx.settings.label_prefix
    uid = labels.get(f"{prefix}/conversion-uid")
    conversion = body.metadata.annotations.get(f"{prefix}/conversion-name")
    if not uid or not conversion:
        return
    name = str(body.metadata.get("name"))
    deleted = name if type == "DELETED" else None
    observed = _observed((namespace, uid), index_jobs, index_pods, deleted_pod=deleted)
    if deleted is None:
        observed = Observed(jobs=observed.jobs, pods=[*(p for p in observed.pods if _name(p) != name),
                                                      dict(body)])
    _sync_quietly(ctx, namespace, conversion, uid, observed)


def needs_poll(body: kopf.Body, **_: Any) -> bool:
    """Active (accepted, not finished) or waiting for a re-check, for the current generation."""
    status = parse_status(body)
    generation = int(body.metadata.get("generation") or 1)
    active = is_accepted(status, generation) and not is_terminal(status, generation)
    return active or awaits_recheck(status, generation)


def on_poll(body: kopf.Body, name: str, namespace: str | None, uid: str, memo: kopf.Memo,
            index_jobs: ObjIndex | None = None, index_pods: ObjIndex | None = None, **_: Any) -> None:
    ctx = _context(memo)
    namespace = namespace or ""
    with _kopf_errors():
        if awaits_recheck(parse_status(body), int(body.metadata.get("generation") or 1)):
            reconcile(ctx, namespace, name)
        else:
            sync(ctx, namespace, name, uid, _observed((namespace, uid), index_jobs, index_pods))


def register_handlers(registry: kopf.OperatorRegistry, *, poll_interval: float = POLL_INTERVAL) -> None:
    """Register every handler of the operator on `registry`."""
    kopf.on.startup(registry=registry)(on_startup)
    kopf.on.cleanup(registry=registry)(on_cleanup)
    kopf.on.create(*CONVERSIONS, id="reconcile-create", registry=registry)(reconcile_conversion)
    kopf.on.resume(*CONVERSIONS, id="reconcile-resume", registry=registry)(reconcile_conversion)
    kopf.on.update(*CONVERSIONS, id="reconcile-update", field="spec", registry=registry)(reconcile_conversion)
    kopf.timer(*CONVERSIONS, id="poll", interval=poll_interval, when=needs_poll,
               registry=registry)(on_poll)
    kopf.index(*JOBS, id="index_jobs", labels=MANAGED, registry=registry)(index_jobs)
    kopf.index(*PODS, id="index_pods", labels=MANAGED, registry=registry)(index_pods)
    kopf.on.event(*JOBS, id="job-event", labels=MANAGED, registry=registry)(on_job_event)
    kopf.on.event(*PODS, id="pod-event", labels=MANAGED, registry=registry)(on_pod_event)


register_handlers(kopf.get_default_registry())
