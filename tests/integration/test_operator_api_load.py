"""API load of queued conversions (issue 11): many resources whose Jobs have no pod cost no requests.

A conversion queued in Kueue has a suspended Job and no pod. Kubernetes 1.20 (the test control plane) drops
`spec.suspend`, so this test makes the same state by stopping kube-controller-manager: the Jobs are created and get
no pod. Then, for a window, every request of the operator's ServiceAccount is taken from the API server's audit log.
Nothing may name one of the resources (no per-resource GET, no log read): only watch events move them on.

    MS2MG_API_LOAD_RESOURCES (default 50), MS2MG_API_LOAD_SECONDS (default 40, more than twice the 15 s period at
    which the operator used to poll) size the measurement; docs/operator-testing.md reports 200 resources for 300 s.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.operator_env import (
    Obj,
    audit_events,
    conversion,
    has,
    operator_env,
    phase,
)
from tests.k8s.cluster import Cluster, wait_for

pytestmark = [pytest.mark.k8s, pytest.mark.slow]

PREFIX = "ms2mg.io/"
QUIET_SECONDS = 15


def settled(body: Obj) -> bool:
    """Accepted with its Job, and kopf done with it (diff base stored, no handler progress left)."""
    annotations = body["metadata"].get("annotations") or {}
    kopf_own = {f"{PREFIX}last-handled-configuration", f"{PREFIX}kopf-managed"}
    progress = [k for k in annotations if k.startswith(PREFIX) and k not in kopf_own]
    return (has("Accepted", reason="JobCreated")(body) and f"{PREFIX}last-handled-configuration" in annotations
            and not progress)


def describe(event: Obj) -> str:
    ref = event.get("objectRef") or {}
    sub = f"/{ref['subresource']}" if ref.get("subresource") else ""
    return f"{event.get('verb')} {ref.get('resource', event.get('requestURI', '?'))}{sub}"


@pytest.mark.timeout(1800)
def test_queued_conversions_cost_no_requests(k8s_cluster: Cluster, ms2mg_crd: str, k8s_namespace: str,
                                             sample_volume: Path, tmp_path: Path,
                                             report: Callable[[str], None]) -> None:
    count = int(os.environ.get("MS2MG_API_LOAD_RESOURCES") or 50)
    window = float(os.environ.get("MS2MG_API_LOAD_SECONDS") or 40)
    names = {f"q-{i:03d}" for i in range(count)}
    k8s_cluster.stop_controller_manager()  # no Job controller: the Jobs get no pod, as while queued
    try:
        with operator_env(k8s_cluster, k8s_namespace, sample_volume, tmp_path) as env:
            t0 = time.time()
            env.apply(*[conversion(n, destination=f"out/{n}", queueName="team-a") for n in sorted(names)])

            def all_settled() -> bool:
                items = env.conversions()
                return len(items) == count and all(settled(b) for b in items)

            wait_for(all_settled, timeout=900, interval=2.0, what=f"{count} resources accepted and settled")

            def quiet() -> bool:  # kopf may still handle delayed events of the burst (see docs/operator-testing.md)
                stamps = [_stamp(e) for e in audit_events(env.cluster, env.operator_user, t0)]
                return time.time() - max(stamps, default=t0) >= QUIET_SECONDS

            wait_for(quiet, timeout=600, interval=2.0, what=f"{QUIET_SECONDS} s without a request by the operator")
            start = time.time()
            time.sleep(window)  # the measurement window: nothing happens to the resources
            end = time.time()
            phases = Counter(phase(b) for b in env.conversions())
            jobs, pods = len(env.jobs()), len(env.pods())
            events = [e for e in audit_events(env.cluster, env.operator_user, start)
                      if e.get("requestReceivedTimestamp", "") and _before(e, end)]
    finally:
        k8s_cluster.start_controller_manager()
    per_resource = [e for e in events if (e.get("objectRef") or {}).get("name") in names]
    setup = len([e for e in audit_events(k8s_cluster, env.operator_user, t0) if _stamp(e) < start])
    minutes = (end - start) / 60
    report(f"API load: {count} resources with a Job and no pod, accepted, settled and quiet after "
           f"{start - t0:.0f} s ({setup} requests); then {len(events)} requests by the operator in "
           f"{end - start:.0f} s = "
           f"{len(events) / minutes:.1f}/min, {len(per_resource) / minutes:.1f}/min naming a resource "
           f"({dict(Counter(describe(e) for e in events).most_common())})")
    assert (jobs, pods) == (count, 0)
    assert phases == {"Pending": count}
    assert per_resource == [], f"the operator polled idle resources: {Counter(describe(e) for e in per_resource)}"


def _stamp(event: Obj) -> float:
    from datetime import datetime

    return datetime.fromisoformat(event["requestReceivedTimestamp"].replace("Z", "+00:00")).timestamp()


def _before(event: Obj, end: float) -> bool:
    return _stamp(event) < end
