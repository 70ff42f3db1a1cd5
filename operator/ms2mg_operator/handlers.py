"""kopf wiring: thin typed handlers that call `controller` and translate its errors.

* startup: kopf settings (standalone, progress/diff-base in `ms2mg.io/` annotations so `.status` holds only
  our model, timeouts, server-side label selectors for Jobs and pods), the API client, the /metrics server and
  the poller thread; cleanup stops them and closes the API client.
* create / resume / update(spec) of a CheckpointConversion -> `controller.reconcile`.
* indexes of our Jobs and pods (by conversion uid, parsed to `JobInfo`/`PodInfo`) and `on.event` handlers on
  them -> `controller.sync`: the status follows the Job and pod watch streams.
* `on.event` of CheckpointConversions: a deletion makes the resources of its namespace that wait for a
  destination re-check at once, and drops the deleted one from the poller.
* No timers and no daemons: kopf would put its finalizer on every resource they match, and a resource deleted
  while the operator is down would then hang. The periodic work (progress reads while a pod runs, re-checks while
  a resource waits) is the controller's poller (poller.py). So the operator sets no finalizer; kopf removes the
  one older versions set (`ms2mg.io/kopf-finalizer`) from every resource it handles.

Errors: `TransientApiError` -> `kopf.TemporaryError(delay=...)`; any other `ApiError` -> `kopf.PermanentError`.
Handlers return None: status is written by the controller, never through kopf's handler results.

`register_handlers()` registers everything on a given registry (tests use a fresh one); importing this module
registers on kopf's default registry, which `kopf run -m ms2mg_operator.handlers` uses.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import kopf

from ms2mg_operator.api.v1alpha1 import GROUP, PLURAL, VERSION
from ms2mg_operator.config import OperatorSettings
from ms2mg_operator.controller import Context, poll, reconcile, sync
from ms2mg_operator.jobs import CONTAINER_NAME
from ms2mg_operator.keys import MANAGED_BY, MANAGED_BY_LABEL, MANAGED_SELECTOR
from ms2mg_operator.kube import ApiError, KubeClient, TransientApiError
from ms2mg_operator.metrics import Metrics
from ms2mg_operator.observe import JobInfo, PodInfo, job_info, pod_info
from ms2mg_operator.poller import Task

CONTEXT_KEY = "ms2mg_context"
SETTINGS_KEY = "ms2mg_settings"
"""memo keys: tests (or an embedding program) may preset SETTINGS_KEY and KUBE_KEY before start-up."""
KUBE_KEY = "ms2mg_kube"
CONVERSIONS = (GROUP, VERSION, PLURAL)
JOBS = ("batch/v1", "jobs")
PODS = ("v1", "pods")
MANAGED = {MANAGED_BY_LABEL: MANAGED_BY}
IndexKey = tuple[str, str]
JobIndex = kopf.Index[IndexKey, JobInfo]
PodIndex = kopf.Index[IndexKey, PodInfo]

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
    keys = ours.keys
    settings.peering.standalone = True
    settings.persistence.finalizer = keys.finalizer  # none is set; kopf removes this one where it is left over
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=keys.prefix)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=keys.prefix,
                                                                             key=keys.last_handled)
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 210
    settings.watching.client_timeout = 240
    settings.watching.connect_timeout = 30
    settings.networking.request_timeout = 60
    settings.networking.connect_timeout = 30
    settings.watching.label_selectors[JOBS] = MANAGED_SELECTOR
    settings.watching.label_selectors[PODS] = MANAGED_SELECTOR


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
    ctx = Context(kube=kube, settings=ours, metrics=metrics)
    ctx.poller.start(partial(poll, ctx))
    memo[CONTEXT_KEY] = ctx


def on_cleanup(memo: kopf.Memo, **_: Any) -> None:
    ctx = memo.get(CONTEXT_KEY)
    if isinstance(ctx, Context):
        ctx.poller.stop()
        ctx.metrics.stop()
        ctx.kube.close()


def reconcile_conversion(name: str, namespace: str | None, memo: kopf.Memo, **_: Any) -> None:
    with _kopf_errors():
        reconcile(_context(memo), namespace or "", name)


def on_conversion_event(type: str, name: str, namespace: str | None, memo: kopf.Memo, **_: Any) -> None:
    """A deleted resource frees its destination: the waiting resources of its namespace re-check now."""
    if type != "DELETED":
        return
    ctx = _context(memo)
    ctx.poller.forget((namespace or "", name))
    ctx.poller.kick(namespace or "", Task.RECHECK)


def index_jobs(body: kopf.Body, namespace: str | None, labels: kopf.Labels, memo: kopf.Memo,
               **_: Any) -> dict[IndexKey, JobInfo]:
    """Our Jobs by (namespace, conversion uid): the facts the status needs."""
    uid = labels.get(_context(memo).settings.keys.conversion_uid)
    return {(namespace or "", uid): job_info(body)} if uid else {}


def index_pods(body: kopf.Body, namespace: str | None, labels: kopf.Labels, memo: kopf.Memo,
               **_: Any) -> dict[IndexKey, PodInfo]:
    """Our pods by (namespace, conversion uid): phase, generation and the converter container's state."""
    keys = _context(memo).settings.keys
    uid = labels.get(keys.conversion_uid)
    return {(namespace or "", uid): pod_info(body, CONTAINER_NAME, keys)} if uid else {}


def _listed(index: kopf.Index[IndexKey, Any] | None, key: IndexKey, skip: str) -> list[Any]:
    """The index's entries for `key`, except the one named `skip` (the event's own object)."""
    return [o for o in (index.get(key, ()) if index is not None else ()) if o.name != skip]


def _sync_quietly(ctx: Context, namespace: str, name: str, uid: str, jobs: Sequence[JobInfo],
                  pods: Sequence[PodInfo], deleted_job: str | None = None) -> None:
    """Event handlers are not retried by kopf: log API errors; the next event or the poller catches up."""
    try:
        sync(ctx, namespace, name, uid, jobs, pods, deleted_job)
    except ApiError as e:
        logger.warning("Status of %s/%s not updated (will catch up): %s", namespace, name, e)


def on_job_event(type: str, body: kopf.Body, namespace: str | None, labels: kopf.Labels, memo: kopf.Memo,
                 index_jobs: JobIndex | None = None, index_pods: PodIndex | None = None, **_: Any) -> None:
    ctx = _context(memo)
    namespace = namespace or ""
    uid = labels.get(ctx.settings.keys.conversion_uid)
    owner = next((ref for ref in body.metadata.get("ownerReferences") or []
                  if ref.get("uid") == uid and ref.get("controller")), None)
    if not uid or owner is None:
        return
    name = str(body.metadata.get("name"))
    jobs: list[JobInfo] = _listed(index_jobs, (namespace, uid), name)
    if type != "DELETED":  # the event's body is the freshest view of this Job
        jobs.append(job_info(body))
    pods: list[PodInfo] = _listed(index_pods, (namespace, uid), "")
    _sync_quietly(ctx, namespace, str(owner.get("name")), uid, jobs, pods,
                  deleted_job=name if type == "DELETED" else None)


def on_pod_event(type: str, body: kopf.Body, namespace: str | None, labels: kopf.Labels, memo: kopf.Memo,
                 index_jobs: JobIndex | None = None, index_pods: PodIndex | None = None, **_: Any) -> None:
    ctx = _context(memo)
    namespace = namespace or ""
    keys = ctx.settings.keys
    uid = labels.get(keys.conversion_uid)
    conversion = body.metadata.annotations.get(keys.conversion_name)
    if not uid or not conversion:
        return
    name = str(body.metadata.get("name"))
    pods: list[PodInfo] = _listed(index_pods, (namespace, uid), name)
    if type != "DELETED":
        pods.append(pod_info(body, CONTAINER_NAME, keys))
    jobs: list[JobInfo] = _listed(index_jobs, (namespace, uid), "")
    _sync_quietly(ctx, namespace, conversion, uid, jobs, pods)


def register_handlers(registry: kopf.OperatorRegistry) -> None:
    """Register every handler of the operator on `registry`."""
    kopf.on.startup(registry=registry)(on_startup)
    kopf.on.cleanup(registry=registry)(on_cleanup)
    kopf.on.create(*CONVERSIONS, id="reconcile-create", registry=registry)(reconcile_conversion)
    kopf.on.resume(*CONVERSIONS, id="reconcile-resume", registry=registry)(reconcile_conversion)
    kopf.on.update(*CONVERSIONS, id="reconcile-update", field="spec", registry=registry)(reconcile_conversion)
    kopf.on.event(*CONVERSIONS, id="conversion-event", registry=registry)(on_conversion_event)
    kopf.index(*JOBS, id="index_jobs", labels=MANAGED, registry=registry)(index_jobs)
    kopf.index(*PODS, id="index_pods", labels=MANAGED, registry=registry)(index_pods)
    kopf.on.event(*JOBS, id="job-event", labels=MANAGED, registry=registry)(on_job_event)
    kopf.on.event(*PODS, id="pod-event", labels=MANAGED, registry=registry)(on_pod_event)


register_handlers(kopf.get_default_registry())
