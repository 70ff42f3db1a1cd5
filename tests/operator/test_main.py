"""`python -m ms2mg_operator` as a process: kubeconfig login, a Job, /metrics and the liveness endpoint."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import urllib.request
from pathlib import Path

import kmock as km
import pytest

from ms2mg_operator.config import OperatorSettings
from ms2mg_operator.crdgen import build_crd
from tests.operator.harness import CONVERSIONS, Cluster, has, new_client
from tests.operator.kmock_shim import StampingEmulator, register_crd
from tests.operator.test_handlers import new_body

pytestmark = [pytest.mark.kmock(cls=StampingEmulator), pytest.mark.timeout(120),
              pytest.mark.filterwarnings("ignore:read_binary is deprecated:DeprecationWarning")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


async def test_operator_process(kmock: km.KubernetesEmulator, settings: OperatorSettings, tmp_path: Path) -> None:
    kmock.resources.load_bundled()
    register_crd(kmock, build_crd())
    url = str(kmock.url).rstrip("/")
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        f"apiVersion: v1\nkind: Config\nclusters: [{{name: k, cluster: {{server: '{url}'}}}}]\n"
        "users: [{name: u, user: {token: test}}]\ncontexts: [{name: c, context: {cluster: k, user: u}}]\n"
        "current-context: c\n")
    metrics, liveness = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MS2MG_", "KUBERNETES_"))}
    env.update(KUBECONFIG=str(kubeconfig), MS2MG_METRICS_PORT=str(metrics), MS2MG_LIVENESS_PORT=str(liveness),
               MS2MG_LOG_FORMAT="json")
    cluster = Cluster(kmock=kmock, api=new_client(url, settings))
    await cluster.add_pvcs("mindformers", "megatron")
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "ms2mg_operator", env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        await cluster.post(CONVERSIONS, new_body())
        body = await cluster.wait(has("Accepted", reason="JobCreated"), timeout=60)
        assert len(await cluster.jobs()) == 1
        assert body["status"]["jobName"]
        text = await asyncio.to_thread(fetch, f"http://127.0.0.1:{metrics}/metrics")
        assert "ms2mg_jobs_created_total 1.0" in text
        assert "ms2mg_conversions_total" in text
        await asyncio.to_thread(fetch, f"http://127.0.0.1:{liveness}/healthz")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            output, _ = await asyncio.wait_for(proc.communicate(), 30)
        except TimeoutError:
            proc.kill()
            output, _ = await proc.communicate()
    log = output.decode(errors="replace")
    assert '"message"' in log, log[-2000:]  # JSON log lines
    assert "Traceback" not in log, log[-4000:]
