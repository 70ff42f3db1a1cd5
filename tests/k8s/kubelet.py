"""A fake kubelet for the test control plane: runs the containers of pods as local processes.

The test control plane (docs/k8s-testing.md) has no scheduler and no kubelet, so the pods the Job controller creates
stay Pending. :class:`FakeKubelet` plays both, through the real API, for the pods matching a label selector:

* it registers a ``Node`` (``status.addresses`` InternalIP 127.0.0.1, ``daemonEndpoints.kubeletEndpoint.Port`` = its
  HTTPS port, ``Ready=True``) and binds each pod to it through the ``pods/binding`` subresource, as a scheduler does;
* it runs the pod's **exact** container ``command`` + ``args`` as a subprocess. Only the command's first word is
  mapped to a local program (:attr:`FakeKubelet.commands`, default ``ms2mg`` -> the venv's ``ms2mg``); a container
  without ``command`` (the image's entrypoint) is mapped by its image repository (:attr:`FakeKubelet.images`, e.g.
  ``{"ms2mg-operator": [".venv/bin/ms2mg-operator"]}``), its ``args`` appended. The volume mount paths in the
  arguments (and in ``env`` values) are rewritten to host directories: a ``persistentVolumeClaim`` volume to
  :attr:`FakeKubelet.volumes` ``[claimName]`` (``subPath`` honoured), an ``emptyDir`` to a per-pod temporary
  directory, and the container's ``terminationMessagePath`` (``/dev/termination-log``) to a per-pod file. The
  environment is the container's ``env`` (literal values and ``fieldRef`` to the pod's name, namespace, uid, node,
  service account, IP) plus ``PATH``, ``HOSTNAME`` and ``LANG`` -- not the test process's environment;
* a pod that mounts its ServiceAccount token (``automountServiceAccountToken`` not false; the converter pods do
  not) gets a token bound to the pod from the TokenRequest API, written with ``ca.crt`` and ``namespace`` to
  ``<pod dir>/serviceaccount/``, and ``KUBECONFIG`` pointing at a kubeconfig with that token: the in-cluster
  paths (``/var/run/secrets/...``) cannot be mapped, and the ``kubernetes`` client and kopf fall back to
  ``$KUBECONFIG``. So a pod talks to the API with exactly its ServiceAccount's RBAC;
* nothing else from the pod spec is executed or honoured: no image, no ``$(VAR)`` expansion, no probes, no
  resources, no securityContext, no ``readOnly`` enforcement (the process runs as the test user on the host file
  system, so a relative symlink resolves as in a container, an absolute one against the host), no restarts (each
  pod runs once, whatever its ``restartPolicy``), one container per pod;
* it writes the pod status like a kubelet (``PATCH pods/<name>/status``): ``Running`` with
  ``containerStatuses[].state.running`` and ``startTime`` when the process starts, then ``Succeeded``/``Failed`` with
  ``state.terminated`` {exitCode, reason (Completed/Error), message = the termination-message file (at most 4096
  bytes; ``FallbackToLogsOnError`` honoured), startedAt, finishedAt}. The real Job controller (KCM) then updates
  the Job;
* it serves ``GET /containerLogs/{namespace}/{pod}/{container}`` (``tailLines``, ``limitBytes``, ``timestamps``,
  ``follow``) over HTTPS with a certificate signed by the cluster CA and requires the API server's kubelet client
  certificate, so ``kubectl logs`` / ``GET pods/<name>/log`` work through the API server exactly as on a cluster
  (start-control-plane.sh passes ``--kubelet-certificate-authority`` and ``--kubelet-client-certificate``);
* a pod marked for deletion (``deletionTimestamp``) gets SIGTERM (SIGKILL after its grace period, at most
  :attr:`FakeKubelet.max_grace_seconds`) and is then removed with ``gracePeriodSeconds=0``, as a kubelet does, so
  garbage collection and namespace deletion work.

Stdout and stderr of the process go, merged and line by line, to the pod log (kept in memory and in
``<workdir>/<namespace>_<pod>/container.log``). Pods beyond :attr:`FakeKubelet.capacity` running at once stay
Pending and unbound until a slot frees up, as on a full node.

Test hooks: :meth:`FakeKubelet.hold_when` freezes a container (SIGSTOP) right after a log line that matches a
predicate, before that line's successors reach the log (deterministic "conversion in progress" states);
:meth:`release` continues it (SIGCONT). :meth:`hold_at_progress` is the same for ``--progress json`` lines.
:meth:`shield` makes a held run behave like a converter inside its commit (which ignores SIGTERM until its
checkpoint is in place): deleting its pod sends no signal; after :meth:`release` the process runs to its end,
and only then is the pod removed.

Usage::

    from tests.k8s.kubelet import FakeKubelet

    with FakeKubelet(k8s_cluster, namespace=ns, volumes={"mindformers": src_dir, "megatron": dst_dir}) as kubelet:
        ...                                   # create the Job (or the CheckpointConversion)
        run = kubelet.wait_for_run(lambda r: r.finished, timeout=60)
        assert run.exit_code == 0, run.log_text()

API (stable; other tests use it): :class:`FakeKubelet` (constructor arguments, ``volumes``, ``commands``,
``images``, ``capacity``, ``start``/``stop`` or ``with``, ``node_name``, ``port``, ``runs``, ``errors``, ``run_for``,
``wait_for_run``, ``hold_when``, ``hold_at_progress``, ``shield``, ``release``, ``wait_held``), :class:`PodRun`
(its fields and
``log_text``), :data:`DEFAULT_SELECTOR`. Only the standard library is used (TLS certificates via ``openssl``).
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import logging
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.k8s.cluster import Cluster, ControlPlaneError

log = logging.getLogger("fake-kubelet")

DEFAULT_SELECTOR = "app.kubernetes.io/managed-by=ms2mg-operator"
"""Pods the fake kubelet takes by default: those of ms2mg converter Jobs."""
MAX_TERMINATION_MESSAGE = 4096
"""A kubelet truncates the termination message to 4096 bytes."""
FALLBACK_LOG_LINES, FALLBACK_LOG_BYTES = 80, 2048
"""``FallbackToLogsOnError``: the last 80 lines / 2048 bytes of the log."""

Obj = dict[str, Any]


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _default_commands() -> dict[str, list[str]]:
    venv_ms2mg = Path(sys.executable).with_name("ms2mg")
    return {"ms2mg": [str(venv_ms2mg)] if venv_ms2mg.exists() else [sys.executable, "-m", "ms2mg_converter"]}


def _repository(image: str) -> str:
    """``registry/name:tag@sha256:...`` -> ``registry/name``."""
    name = image.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    return name[:colon] if colon > slash else name


def _field(pod: Obj, node: str, path: str) -> str:
    """The value of an env ``fieldRef`` (the fields a kubelet resolves)."""
    meta, spec = pod.get("metadata", {}), pod.get("spec", {})
    values = {"metadata.name": meta.get("name"), "metadata.namespace": meta.get("namespace"),
              "metadata.uid": meta.get("uid"), "spec.nodeName": node,
              "spec.serviceAccountName": spec.get("serviceAccountName") or "default",
              "status.hostIP": "127.0.0.1", "status.podIP": "127.0.0.1"}
    if path.startswith(("metadata.labels['", "metadata.annotations['")):
        kind, key = path.split("['", 1)
        return str((meta.get(kind.split(".")[1]) or {}).get(key.rstrip("']"), ""))
    if path not in values:
        raise KubeletError(f"env fieldRef {path!r} is not supported by the fake kubelet")
    return str(values[path] or "")


class KubeletError(RuntimeError):
    """A pod could not be run (unknown command or volume, unsupported spec); also recorded in ``errors``."""


@dataclass
class PodRun:
    """One container run of one pod (the fake kubelet runs each pod once: ``restartPolicy: Never``)."""

    namespace: str
    name: str
    uid: str
    container: str
    workdir: Path
    """Per-pod directory: ``container.log``, ``termination-log``, ``volumes/<emptyDir name>``."""
    argv: list[str] = field(default_factory=list)
    """What was executed (the mapped command and the rewritten arguments)."""
    pod_argv: list[str] = field(default_factory=list)
    """The container's ``command + args`` as in the pod spec."""
    labels: dict[str, str] = field(default_factory=dict)
    pid: int | None = None
    started_at: str | None = None
    finished_at: str | None = None
    exit_code: int | None = None
    """The process's exit code; 128+N when it was killed by signal N."""
    termination_message: str | None = None
    lines: list[tuple[str, str]] = field(default_factory=list)
    """(RFC 3339 timestamp, line without newline) of everything the process printed so far."""
    killed: bool = False
    """Stopped because the pod was deleted (or the kubelet stopped)."""
    shielded: bool = False
    """A deletion of the pod waits for the process to end by itself (see :meth:`FakeKubelet.shield`)."""
    deletion_seen: threading.Event = field(default_factory=threading.Event, repr=False)
    """The pod was marked for deletion while this run was alive."""
    finished: threading.Event = field(default_factory=threading.Event, repr=False)
    held: threading.Event = field(default_factory=threading.Event, repr=False)
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _cont: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def key(self) -> tuple[str, str]:
        return self.namespace, self.name

    @property
    def log_path(self) -> Path:
        return self.workdir / "container.log"

    @property
    def is_finished(self) -> bool:
        return self.finished.is_set()

    def log_text(self) -> str:
        return "".join(line + "\n" for _, line in list(self.lines))


class _LogHandler(http.server.BaseHTTPRequestHandler):
    """``GET /containerLogs/{ns}/{pod}/{container}`` (and ``/healthz``) of one FakeKubelet."""

    server: _LogServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("log server: " + format, *args)

    def _send(self, code: int, text: str, content_type: str = "text/plain") -> None:
        data = text.encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        parts = [urllib.parse.unquote(p) for p in url.path.strip("/").split("/")]
        if parts == ["healthz"]:
            self._send(200, "ok")
            return
        if len(parts) != 4 or parts[0] != "containerLogs":
            self._send(404, f"404 page not found: {url.path}")
            return
        _, namespace, pod, container = parts
        run = self.server.kubelet.run_for(namespace, pod)
        if run is None or run.container != container:
            self._send(404, f'container "{container}" in pod "{pod}" (namespace {namespace}) not found')
            return
        if query.get("previous", ["false"])[0] == "true":
            self._send(400, f'previous terminated container "{container}" in pod "{pod}" not found')
            return
        try:
            tail = int(query["tailLines"][0]) if "tailLines" in query else None
            limit = int(query["limitBytes"][0]) if "limitBytes" in query else None
            since = int(query["sinceSeconds"][0]) if "sinceSeconds" in query else None
        except ValueError:
            self._send(400, "invalid tailLines, limitBytes or sinceSeconds")
            return
        stamps = query.get("timestamps", ["false"])[0] == "true"
        follow = query.get("follow", ["false"])[0] == "true"
        lines = self._select(run, tail, since)
        if not follow:
            text = "".join(self._format(ts, line, stamps) for ts, line in lines)
            self._send(200, text.encode()[:limit].decode(errors="ignore") if limit is not None else text)
            return
        self._follow(run, lines, stamps, limit)

    @staticmethod
    def _format(ts: str, line: str, stamps: bool) -> str:
        return f"{ts} {line}\n" if stamps else f"{line}\n"

    @staticmethod
    def _select(run: PodRun, tail: int | None, since: int | None) -> list[tuple[str, str]]:
        lines = list(run.lines)
        if since is not None:
            cutoff = datetime.now(UTC).timestamp() - since
            lines = [(ts, line) for ts, line in lines if datetime.fromisoformat(ts).timestamp() >= cutoff]
        if tail is not None:
            lines = lines[-tail:] if tail > 0 else []
        return lines

    def _follow(self, run: PodRun, first: list[tuple[str, str]], stamps: bool, limit: int | None) -> None:
        """Stream (chunked) until the container exits or ``limitBytes`` is reached."""
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        sent = 0
        index = len(run.lines) - len(first)
        try:
            while True:
                new = list(run.lines[index:])
                index += len(new)
                for ts, line in new:
                    data = self._format(ts, line, stamps).encode()
                    if limit is not None:
                        data = data[: max(0, limit - sent)]
                    if data:
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                        sent += len(data)
                if (limit is not None and sent >= limit) or (run.is_finished and index >= len(run.lines)):
                    break
                self.wfile.flush()
                time.sleep(0.1)
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass  # the client went away


class _LogServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, kubelet: FakeKubelet, context: ssl.SSLContext) -> None:
        super().__init__(("127.0.0.1", 0), _LogHandler)
        self.kubelet = kubelet
        self.socket = context.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        sock.settimeout(30)
        return sock, addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("log server: error serving %s", client_address, exc_info=True)


class FakeKubelet:
    """Scheduler + kubelet for the pods matching ``label_selector`` (in ``namespace``, or all namespaces).

    ``volumes``: PersistentVolumeClaim name -> host directory (set or change it any time before the pod starts).
    ``commands``: the first word of a container's command -> the local argv prefix that replaces it.
    ``images``: image repository (without tag or digest) -> local argv of a container that has no command.
    ``capacity``: pods running at once; others stay Pending (unbound) until a slot is free.
    ``node_name``: the Node to register (default ``fake-kubelet-<random>``).
    ``workdir``: where per-pod directories go (default: a temporary directory, removed by :meth:`stop` unless
    ``keep_workdir``).
    ``max_grace_seconds``: at most this long between SIGTERM and SIGKILL of a deleted pod's process.
    """

    def __init__(
        self,
        cluster: Cluster,
        *,
        namespace: str | None = None,
        label_selector: str = DEFAULT_SELECTOR,
        volumes: Mapping[str, Path | str] | None = None,
        commands: Mapping[str, list[str]] | None = None,
        images: Mapping[str, list[str]] | None = None,
        capacity: int = 4,
        node_name: str | None = None,
        workdir: Path | str | None = None,
        keep_workdir: bool = False,
        max_grace_seconds: float = 5.0,
    ) -> None:
        self.cluster = cluster
        self.namespace = namespace
        self.label_selector = label_selector
        self.volumes: dict[str, Path] = {k: Path(v) for k, v in (volumes or {}).items()}
        self.commands: dict[str, list[str]] = dict(commands or _default_commands())
        self.images: dict[str, list[str]] = dict(images or {})
        self.capacity = capacity
        self.node_name = node_name or f"fake-kubelet-{secrets.token_hex(3)}"
        self.max_grace_seconds = max_grace_seconds
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="fake-kubelet-"))
        self.keep_workdir = keep_workdir
        self.runs: dict[tuple[str, str], PodRun] = {}
        """Every run so far, by (namespace, pod name)."""
        self.errors: list[str] = []
        """Pods the kubelet could not run, and why (a test should usually assert this stays empty)."""
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._pending: dict[tuple[str, str], Obj] = {}
        self._hold: Callable[[PodRun, str], bool] | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._server: _LogServer | None = None
        self._watch_conn: http.client.HTTPSConnection | None = None
        self._ssl_client = ssl.create_default_context(cafile=str(cluster.ca_file))
        self.port = 0

    # --- life cycle ---------------------------------------------------------------------------------------------
    def __enter__(self) -> FakeKubelet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> FakeKubelet:
        """Start the log server, register the Node, start watching pods. Returns self."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._server = _LogServer(self, self._server_tls_context())
        self.port = self._server.server_address[1]
        self._spawn(self._server.serve_forever, "log-server")
        self._register_node()
        self._spawn(self._watch_loop, "pod-watch")
        return self

    def stop(self) -> None:
        """Stop watching, kill every process still running (no status is written: the node "died"), remove the
        Node and the log server. Idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        conn = self._watch_conn
        if conn is not None and conn.sock is not None:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)
        with self._lock:
            runs = [r for r in self.runs.values() if not r.is_finished]
        for run in runs:
            run.killed = True
            self._signal(run, signal.SIGKILL)
        for run in runs:
            run.finished.wait(10)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        with contextlib.suppress(Exception):
            self._api("DELETE", f"/api/v1/nodes/{self.node_name}")
        for thread in self._threads:
            thread.join(timeout=10)
        if self._own_workdir and not self.keep_workdir:
            import shutil

            shutil.rmtree(self.workdir, ignore_errors=True)

    def _spawn(self, target: Callable[..., Any], name: str, *args: Any) -> threading.Thread:
        thread = threading.Thread(target=target, args=args, name=f"{self.node_name}-{name}", daemon=True)
        thread.start()
        self._threads.append(thread)
        return thread

    # --- queries and hooks --------------------------------------------------------------------------------------
    def run_for(self, namespace: str, pod: str) -> PodRun | None:
        with self._lock:
            return self.runs.get((namespace, pod))

    def wait_for_run(self, predicate: Callable[[PodRun], bool] = lambda r: True, *, timeout: float = 60.0,
                     what: str = "a pod run") -> PodRun:
        """The first run (in start order) for which ``predicate(run)`` holds, waiting up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for run in list(self.runs.values()):
                    if predicate(run):
                        return run
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ControlPlaneError(
                        f"timeout after {timeout:.0f}s waiting for {what}; runs: "
                        f"{[(r.name, r.exit_code) for r in self.runs.values()]}; errors: {self.errors}")
                self._changed.wait(min(left, 0.5))

    def hold_when(self, predicate: Callable[[PodRun, str], bool] | None) -> None:
        """Freeze (SIGSTOP) a container right after it printed a line for which ``predicate(run, line)`` is true
        (the following lines do not reach the log until :meth:`release`). ``None`` removes the hook."""
        with self._lock:
            self._hold = predicate

    def hold_at_progress(self, done: int) -> None:
        """Freeze containers after their ``--progress json`` line with ``done >= done``."""

        def at(_: PodRun, line: str) -> bool:
            if not line.startswith("{"):
                return False
            try:
                event = json.loads(line)
            except ValueError:
                return False
            return isinstance(event, dict) and isinstance(event.get("done"), int) and event["done"] >= done

        self.hold_when(at)

    def wait_held(self, *, timeout: float = 60.0) -> PodRun:
        """The first run currently frozen by the hold hook."""
        return self.wait_for_run(lambda r: r.held.is_set() and not r.is_finished, timeout=timeout,
                                 what="a held container")

    def shield(self, run: PodRun) -> None:
        """Let ``run`` (held) behave as a converter inside its commit: a deletion of its pod delivers no signal and
        waits for the process to end by itself after :meth:`release`; then the pod is removed."""
        run.shielded = True

    def release(self, run: PodRun | None = None, *, clear_hook: bool = True) -> None:
        """Continue one held run (or all); by default also remove the hold hook so they run to the end."""
        with self._lock:
            if clear_hook:
                self._hold = None
            runs = [run] if run is not None else list(self.runs.values())
        for r in runs:
            r._cont.set()

    # --- API ----------------------------------------------------------------------------------------------------
    def _api(self, method: str, path: str, body: Obj | None = None,
             content_type: str = "application/json") -> Obj:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.cluster.server + path, data=data, method=method,
            headers={"Authorization": f"Bearer {self.cluster.token}", "Content-Type": content_type,
                     "Accept": "application/json"})
        with urllib.request.urlopen(req, context=self._ssl_client, timeout=30) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else {}

    def _register_node(self) -> None:
        now = _now()
        ready = {"type": "Ready", "status": "True", "reason": "KubeletReady",
                 "message": "fake kubelet (tests/k8s/kubelet.py) is posting ready status",
                 "lastHeartbeatTime": now, "lastTransitionTime": now}
        status = {
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                          {"type": "Hostname", "address": self.node_name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.port}},
            "conditions": [ready],
            "capacity": {"cpu": str(os.cpu_count() or 1), "memory": "16Gi", "pods": str(self.capacity)},
            "allocatable": {"cpu": str(os.cpu_count() or 1), "memory": "16Gi", "pods": str(self.capacity)},
            "nodeInfo": {"machineID": "", "systemUUID": "", "bootID": "", "kernelVersion": os.uname().release,
                         "osImage": "fake-kubelet", "containerRuntimeVersion": "fake://0",
                         "kubeletVersion": "v1.20.2-fake", "kubeProxyVersion": "v0.0.0",
                         "operatingSystem": "linux", "architecture": "amd64"},
        }
        node = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": self.node_name,
                             "labels": {"kubernetes.io/hostname": self.node_name, "kubernetes.io/os": "linux",
                                        "ms2mg.io/fake-kubelet": "true"}},
                "spec": {}, "status": status}
        self._api("POST", "/api/v1/nodes", node)
        self._api("PATCH", f"/api/v1/nodes/{self.node_name}/status", {"status": status},
                  "application/merge-patch+json")

    def _pods_path(self) -> str:
        return f"/api/v1/namespaces/{self.namespace}/pods" if self.namespace else "/api/v1/pods"

    def _watch_loop(self) -> None:
        """List, then watch from the list's resourceVersion; re-list after 410 Gone or any error."""
        selector = urllib.parse.quote(self.label_selector)
        version: str | None = None
        while not self._stop.is_set():
            try:
                if version is None:
                    listed = self._api("GET", f"{self._pods_path()}?labelSelector={selector}")
                    version = listed["metadata"]["resourceVersion"]
                    for pod in listed.get("items", []):
                        self._on_event("ADDED", pod)
                version = self._watch_once(selector, version)
            except Exception as exc:  # noqa: BLE001 - keep watching; the loop re-lists
                if self._stop.is_set():
                    return
                log.warning("%s: pod watch failed (%s); re-listing", self.node_name, exc)
                version = None
                time.sleep(0.5)

    def _watch_once(self, selector: str, version: str) -> str | None:
        host = urllib.parse.urlsplit(self.cluster.server)
        conn = http.client.HTTPSConnection(host.hostname or "127.0.0.1", host.port, context=self._ssl_client,
                                           timeout=90)
        self._watch_conn = conn
        try:
            conn.request("GET", f"{self._pods_path()}?watch=1&labelSelector={selector}&resourceVersion={version}"
                                f"&allowWatchBookmarks=true&timeoutSeconds=60",
                         headers={"Authorization": f"Bearer {self.cluster.token}"})
            resp = conn.getresponse()
            if resp.status != 200:
                raise ControlPlaneError(f"watch pods: HTTP {resp.status} {resp.read()[:300]!r}")
            while not self._stop.is_set():
                line = resp.readline()
                if not line:
                    return version  # server-side timeout: watch again from here
                event = json.loads(line)
                obj = event.get("object") or {}
                if event.get("type") == "ERROR":
                    return None  # e.g. 410 Gone: re-list
                version = obj.get("metadata", {}).get("resourceVersion") or version
                if event.get("type") != "BOOKMARK":
                    self._on_event(event["type"], obj)
            return version
        finally:
            conn.close()
            self._watch_conn = None

    # --- pods ---------------------------------------------------------------------------------------------------
    def _on_event(self, kind: str, pod: Obj) -> None:
        meta, spec, status = pod.get("metadata", {}), pod.get("spec", {}), pod.get("status", {})
        key = (meta.get("namespace", ""), meta.get("name", ""))
        node = spec.get("nodeName")
        with self._lock:
            run = self.runs.get(key)
            if run is not None and run.uid != meta.get("uid"):
                run = None  # a new pod with the name of an old one
            if kind == "DELETED":
                self._pending.pop(key, None)
                if run is not None and not run.is_finished:
                    run.killed = True
                    self._spawn(self._terminate, f"kill-{key[1]}", run, 0.0)
                self._start_pending()
                return
            if node and node != self.node_name:
                self._pending.pop(key, None)
                return  # another node's pod
            if meta.get("deletionTimestamp"):
                self._pending.pop(key, None)
                if node == self.node_name:
                    grace = min(float(meta.get("deletionGracePeriodSeconds") or 0), self.max_grace_seconds)
                    if run is not None and not run.is_finished:
                        if run.shielded and not run.deletion_seen.is_set():
                            run.deletion_seen.set()
                            self._spawn(self._finish_then_delete, f"finish-{key[1]}", run)
                        elif not run.killed and not run.shielded:
                            run.killed = True
                            self._spawn(self._terminate, f"kill-{key[1]}", run, grace)
                    else:
                        self._spawn(self._delete_pod, f"delete-{key[1]}", key, meta.get("uid"))
                return
            if status.get("phase") in ("Succeeded", "Failed") or run is not None:
                return
            if not node:
                self._pending[key] = pod
                self._start_pending()
            else:  # bound to us but not started (e.g. bound before a kubelet restart)
                self._start(pod)

    def _active(self) -> int:
        return sum(1 for r in self.runs.values() if not r.is_finished)

    def _start_pending(self) -> None:
        """Bind and start pending pods while there is capacity (called with the lock held)."""
        while self._pending and self._active() < self.capacity and not self._stop.is_set():
            key, pod = next(iter(self._pending.items()))
            del self._pending[key]
            try:
                self._api("POST", f"/api/v1/namespaces/{key[0]}/pods/{key[1]}/binding", {
                    "apiVersion": "v1", "kind": "Binding",
                    "metadata": {"name": key[1], "namespace": key[0], "uid": pod["metadata"]["uid"]},
                    "target": {"apiVersion": "v1", "kind": "Node", "name": self.node_name}})
            except urllib.error.HTTPError as exc:
                log.info("%s: not binding %s/%s: HTTP %s", self.node_name, *key, exc.code)  # gone or taken
                continue
            except OSError as exc:
                self.errors.append(f"{key[0]}/{key[1]}: binding failed: {exc}")
                continue
            self._start(pod)

    def _start(self, pod: Obj) -> None:
        """Create the run record and its thread (lock held)."""
        meta = pod["metadata"]
        containers = pod.get("spec", {}).get("containers") or []
        key = (meta["namespace"], meta["name"])
        run = PodRun(namespace=key[0], name=key[1], uid=meta["uid"],
                     container=containers[0].get("name", "") if containers else "",
                     workdir=self.workdir / f"{key[0]}_{key[1]}", labels=dict(meta.get("labels") or {}))
        self.runs[key] = run
        self._changed.notify_all()
        self._spawn(self._run, f"run-{key[1]}", run, pod)

    def _fail_to_start(self, run: PodRun, message: str) -> None:
        """The container cannot run: record it, report the pod as failed to start (waiting, like a kubelet)."""
        self.errors.append(f"{run.namespace}/{run.name}: {message}")
        log.error("%s: %s/%s: %s", self.node_name, run.namespace, run.name, message)
        with contextlib.suppress(Exception):
            self._patch_status(run, {"phase": "Pending", "containerStatuses": [{
                "name": run.container, "ready": False, "restartCount": 0, "image": "", "imageID": "",
                "state": {"waiting": {"reason": "CreateContainerConfigError", "message": message[:1024]}}}]})
        run.finished.set()
        with self._changed:
            self._changed.notify_all()
            self._start_pending()

    def _mounts(self, run: PodRun, pod: Obj, container: Obj) -> list[tuple[str, Path]]:
        """(container path, host path) of every mount, longest container path first."""
        volumes = {v.get("name"): v for v in pod.get("spec", {}).get("volumes") or []}
        mounts: list[tuple[str, Path]] = []
        for mount in container.get("volumeMounts") or []:
            volume = volumes.get(mount.get("name"))
            if volume is None:
                raise KubeletError(f"volumeMount {mount.get('name')!r} names no volume of the pod")
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"].get("claimName")
                if claim not in self.volumes:
                    raise KubeletError(f"PersistentVolumeClaim {claim!r} has no host directory in "
                                       f"FakeKubelet.volumes ({sorted(self.volumes)})")
                host = self.volumes[claim]
            elif "emptyDir" in volume:
                host = run.workdir / "volumes" / str(volume["name"])
                host.mkdir(parents=True, exist_ok=True)
            else:
                raise KubeletError(f"volume {volume.get('name')!r}: only persistentVolumeClaim and emptyDir are "
                                   f"supported by the fake kubelet")
            if mount.get("subPath"):
                host = host / mount["subPath"]
                host.mkdir(parents=True, exist_ok=True)
            mounts.append((str(mount["mountPath"]).rstrip("/") or "/", host))
        termination = container.get("terminationMessagePath") or "/dev/termination-log"
        mounts.append((termination, run.workdir / "termination-log"))
        return sorted(mounts, key=lambda m: len(m[0]), reverse=True)

    @staticmethod
    def _rewrite(value: str, mounts: list[tuple[str, Path]]) -> str:
        """Container paths (alone or after ``--flag=``) -> host paths; anything else unchanged."""
        prefix, sep, rest = value.partition("=")
        if sep and rest.startswith("/") and prefix.startswith("-"):
            return f"{prefix}={FakeKubelet._rewrite(rest, mounts)}"
        for inside, host in mounts:
            if value == inside or value.startswith(inside + "/"):
                return str(host) + value[len(inside):]
        return value

    def _prepare(self, run: PodRun, pod: Obj) -> tuple[list[str], dict[str, str], Obj]:
        containers = pod.get("spec", {}).get("containers") or []
        if len(containers) != 1 or pod.get("spec", {}).get("initContainers"):
            raise KubeletError("the fake kubelet runs pods with exactly one container and no init containers")
        container = containers[0]
        command = list(container.get("command") or [])
        if command:
            if command[0] not in self.commands:
                raise KubeletError(f"command {command[0]!r} is not mapped in FakeKubelet.commands "
                                   f"({sorted(self.commands)})")
            program = self.commands[command[0]]
        else:
            repository = _repository(str(container.get("image", "")))
            if repository not in self.images:
                raise KubeletError(f"the container has no command and its image {repository!r} is not mapped in "
                                   f"FakeKubelet.images ({sorted(self.images)})")
            program = self.images[repository]
        run.workdir.mkdir(parents=True, exist_ok=True)
        mounts = self._mounts(run, pod, container)
        (run.workdir / "termination-log").write_bytes(b"")
        args = [*command[1:], *(container.get("args") or [])]
        run.pod_argv = [*command, *(container.get("args") or [])]
        argv = [*program, *(self._rewrite(a, mounts) for a in args)]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOSTNAME": run.name, "LANG": "C.UTF-8"}
        if pod.get("spec", {}).get("automountServiceAccountToken") is not False:
            env["KUBECONFIG"] = str(self._service_account(run, pod))
        for item in container.get("env") or []:
            if "value" in item:
                env[item["name"]] = self._rewrite(str(item["value"]), mounts)
            elif "fieldRef" in (item.get("valueFrom") or {}):
                env[item["name"]] = _field(pod, self.node_name, item["valueFrom"]["fieldRef"].get("fieldPath", ""))
        return argv, env, container

    def _service_account(self, run: PodRun, pod: Obj) -> Path:
        """A token of the pod's ServiceAccount bound to the pod (TokenRequest), as a kubeconfig."""
        sa = pod.get("spec", {}).get("serviceAccountName") or "default"
        try:
            answer = self._api("POST", f"/api/v1/namespaces/{run.namespace}/serviceaccounts/{sa}/token", {
                "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                "spec": {"expirationSeconds": 3600,
                         "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": run.name, "uid": run.uid}}})
        except urllib.error.HTTPError as exc:
            raise KubeletError(f"no token for ServiceAccount {run.namespace}/{sa}: HTTP {exc.code}") from exc
        token = answer["status"]["token"]
        folder = run.workdir / "serviceaccount"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "token").write_text(token)
        (folder / "namespace").write_text(run.namespace)
        (folder / "ca.crt").write_bytes(self.cluster.ca_file.read_bytes())
        kubeconfig = folder / "kubeconfig"
        kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "pod",
            "clusters": [{"name": "cluster", "cluster": {"server": self.cluster.server,
                                                         "certificate-authority": str(folder / "ca.crt")}}],
            "users": [{"name": "pod", "user": {"tokenFile": str(folder / "token")}}],
            "contexts": [{"name": "pod", "context": {"cluster": "cluster", "user": "pod",
                                                     "namespace": run.namespace}}]}))
        return kubeconfig

    def _patch_status(self, run: PodRun, status: Obj) -> None:
        self._api("PATCH", f"/api/v1/namespaces/{run.namespace}/pods/{run.name}/status", {"status": status},
                  "application/merge-patch+json")

    def _container_status(self, run: PodRun, container: Obj, state: Obj, ready: bool) -> Obj:
        return {"name": run.container, "state": state, "ready": ready, "started": ready, "restartCount": 0,
                "image": container.get("image", ""), "imageID": f"fake://{container.get('image', '')}",
                "containerID": f"fake://{run.pid or 0}"}

    def _conditions(self, ready: bool, reason: str | None = None) -> list[Obj]:
        now = _now()
        out = [{"type": "Initialized", "status": "True", "lastTransitionTime": now},
               {"type": "PodScheduled", "status": "True", "lastTransitionTime": now}]
        for kind in ("ContainersReady", "Ready"):
            cond: Obj = {"type": kind, "status": "True" if ready else "False", "lastTransitionTime": now}
            if reason:
                cond["reason"] = reason
            out.append(cond)
        return out

    def _run(self, run: PodRun, pod: Obj) -> None:
        try:
            argv, env, container = self._prepare(run, pod)
        except (KubeletError, OSError) as exc:
            self._fail_to_start(run, str(exc))
            return
        run.argv = argv
        log_file = run.log_path.open("w", encoding="utf-8")
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    cwd=run.workdir, env=env, start_new_session=True)
        except OSError as exc:
            log_file.close()
            self._fail_to_start(run, f"cannot start {argv[0]}: {exc}")
            return
        run._proc, run.pid, run.started_at = proc, proc.pid, _now()
        try:
            self._patch_status(run, {
                "phase": "Running", "hostIP": "127.0.0.1", "podIP": "127.0.0.1", "startTime": run.started_at,
                "conditions": self._conditions(True),
                "containerStatuses": [self._container_status(
                    run, container, {"running": {"startedAt": run.started_at}}, True)]})
        except Exception as exc:  # noqa: BLE001 - the pod may be gone already; keep running until told
            log.info("%s: status of %s/%s not written: %s", self.node_name, run.namespace, run.name, exc)
        self._pump(run, proc, log_file)
        code = proc.wait()
        run.exit_code = 128 - code if code < 0 else code
        run.finished_at = _now()
        run.termination_message = self._termination_message(run, container)
        if not self._stop.is_set():
            terminated = {"exitCode": run.exit_code, "reason": "Completed" if run.exit_code == 0 else "Error",
                          "startedAt": run.started_at, "finishedAt": run.finished_at,
                          "containerID": f"fake://{run.pid}"}
            if run.termination_message:
                terminated["message"] = run.termination_message
            try:
                self._patch_status(run, {
                    "phase": "Succeeded" if run.exit_code == 0 else "Failed",
                    "conditions": self._conditions(False, "PodCompleted"),
                    "containerStatuses": [self._container_status(run, container, {"terminated": terminated},
                                                                 False)]})
            except Exception as exc:  # noqa: BLE001 - deleted meanwhile
                log.info("%s: final status of %s/%s not written: %s", self.node_name, run.namespace, run.name, exc)
        run.finished.set()
        with self._changed:
            self._changed.notify_all()
            self._start_pending()

    def _pump(self, run: PodRun, proc: subprocess.Popen[bytes], log_file: Any) -> None:
        """Copy the process output to the log line by line; apply the hold hook."""
        assert proc.stdout is not None
        with log_file:
            for raw in iter(proc.stdout.readline, b""):
                line = raw.decode(errors="replace").rstrip("\n")
                run.lines.append((datetime.now(UTC).isoformat(timespec="microseconds"), line))
                log_file.write(line + "\n")
                log_file.flush()
                hook = self._hold
                if hook is not None and not run.killed and not run.held.is_set() and hook(run, line):
                    self._signal(run, signal.SIGSTOP)
                    run.held.set()
                    with self._changed:
                        self._changed.notify_all()
                    while not run._cont.wait(0.2) and not self._stop.is_set():
                        pass
                    self._signal(run, signal.SIGCONT)
            proc.stdout.close()

    @staticmethod
    def _termination_message(run: PodRun, container: Obj) -> str | None:
        data = (run.workdir / "termination-log").read_bytes()[:MAX_TERMINATION_MESSAGE]
        if not data.strip() and run.exit_code and container.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            tail = "".join(line + "\n" for _, line in run.lines[-FALLBACK_LOG_LINES:]).encode()
            data = tail[-FALLBACK_LOG_BYTES:]
        text = data.decode(errors="replace")
        return text or None

    @staticmethod
    def _signal(run: PodRun, sig: signal.Signals) -> None:
        if run._proc is None or run._proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(run._proc.pid, sig)

    def _terminate(self, run: PodRun, grace: float) -> None:
        """SIGTERM (SIGKILL after ``grace``), then remove the pod as a kubelet does after a graceful deletion."""
        self._signal(run, signal.SIGTERM)
        self._signal(run, signal.SIGCONT)  # a held (stopped) process must see its SIGTERM
        run._cont.set()
        if not run.finished.wait(max(grace, 0.5)):
            self._signal(run, signal.SIGKILL)
            run.finished.wait(10)
        self._delete_pod(run.key, run.uid)

    def _finish_then_delete(self, run: PodRun) -> None:
        """A shielded run's pod was deleted: no signal; once the process has ended by itself, remove the pod."""
        with self._changed:
            self._changed.notify_all()
        while not run.finished.wait(0.2):
            if self._stop.is_set():
                return
        self._delete_pod(run.key, run.uid)

    def _delete_pod(self, key: tuple[str, str], uid: str | None) -> None:
        body: Obj = {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0}
        if uid:
            body["preconditions"] = {"uid": uid}
        with contextlib.suppress(urllib.error.HTTPError):  # gone already, or a different pod now
            self._api("DELETE", f"/api/v1/namespaces/{key[0]}/pods/{key[1]}", body)

    # --- TLS ----------------------------------------------------------------------------------------------------
    def _server_tls_context(self) -> ssl.SSLContext:
        """Serving cert for 127.0.0.1 signed by the cluster CA; clients must present a cert of the same CA (the API
        server's --kubelet-client-certificate)."""
        pki = self.workdir / "pki"
        pki.mkdir(parents=True, exist_ok=True)
        ca_crt = self.cluster.ca_file
        ca_key = Path(self.cluster.env.get("K8S_CA_KEY") or ca_crt.with_suffix(".key"))
        key, csr, crt, ext = pki / "kubelet.key", pki / "kubelet.csr", pki / "kubelet.crt", pki / "ext.cnf"
        ext.write_text("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                       f"extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost,DNS:{self.node_name}\n")
        for cmd in (
            ["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(key)],
            ["openssl", "req", "-new", "-key", str(key), "-subj", f"/CN=system:node:{self.node_name}",
             "-out", str(csr)],
            ["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key),
             "-CAcreateserial", "-CAserial", str(pki / "ca.srl"), "-days", "2", "-out", str(crt),
             "-extfile", str(ext)],
        ):
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise ControlPlaneError(f"fake kubelet certificate: {' '.join(cmd)} failed: {proc.stderr}")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca_crt))
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_cert_chain(str(crt), str(key))
        return context


@contextlib.contextmanager
def fake_kubelet(cluster: Cluster, **kwargs: Any) -> Iterator[FakeKubelet]:
    """``with fake_kubelet(cluster, volumes=...) as kubelet:`` -- same as ``with FakeKubelet(cluster, ...)``."""
    kubelet = FakeKubelet(cluster, **kwargs)
    kubelet.start()
    try:
        yield kubelet
    finally:
        kubelet.stop()
