"""Drive the local test control plane built by ``scripts/k8s/setup.sh``.

The control plane ("hybrid", see docs/k8s-testing.md) is etcd 3.5 + kube-apiserver 1.20.2 + apiextensions-apiserver
1.36 (CRDs and custom resources, behind the 1.20 aggregator) + kube-controller-manager 1.20.2, all on 127.0.0.1.
Starting and stopping is done by ``scripts/k8s/{start,stop}-control-plane.sh``; this module wraps them and adds the
helpers tests need (kubectl, CRD installation that waits until the resource is really served, namespaces,
ServiceAccount tokens and kubeconfigs).

Only the standard library and PyYAML are needed; ``kubernetes`` is imported lazily by :meth:`Cluster.api_client`.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = REPO_ROOT / "scripts" / "k8s"
SETUP_HINT = "run `scripts/k8s/setup.sh` (builds/caches them in $MS2MG_CACHE, default /var/cache/ms2mg)"

#: binaries the control plane needs, relative to the cache dir
REQUIRED_BINARIES = (
    "k8s-1.20.2/kube-apiserver",
    "k8s-1.20.2/kube-controller-manager",
    "k8s-new/apiextensions-apiserver",
    "k8s-new/etcd",
    "tools/bin/kubectl",
)

#: the 1.20 aggregator routes these API groups to the 1.36 CRD server (label set by start-control-plane.sh too)
_ROUTING_LABELS = {"kube-aggregator.kubernetes.io/automanaged": "false", "ms2mg.io/test-routing": "apiext"}

T = TypeVar("T")


class ControlPlaneError(RuntimeError):
    """The control plane could not be started/stopped, or did not reach an expected state."""


class KubectlError(subprocess.CalledProcessError):
    """kubectl (or helm) exited non-zero; ``str()`` includes the command line and stderr."""

    def __str__(self) -> str:
        cmd = " ".join(self.cmd) if isinstance(self.cmd, list | tuple) else str(self.cmd)
        tool = Path(self.cmd[0]).name if isinstance(self.cmd, list | tuple) else "command"
        return f"{tool} failed (rc={self.returncode}): {cmd}\nstderr: {(self.stderr or '').strip()}"


def cache_dir() -> Path:
    return Path(os.environ.get("MS2MG_CACHE") or "/var/cache/ms2mg")


def missing_binaries(cache: Path | None = None) -> list[Path]:
    """The control-plane binaries that are not (yet) in the cache."""
    base = cache or cache_dir()
    return [base / rel for rel in REQUIRED_BINARIES if not os.access(base / rel, os.X_OK)]


def kubectl_binary() -> Path:
    """kubectl used by the helpers: ``$KUBECTL`` if set, else the one cached by ``scripts/k8s/get-tools.sh``."""
    return Path(os.environ.get("KUBECTL") or cache_dir() / "tools" / "bin" / "kubectl")


def point_kubernetes_client_at(kubeconfig: Path | str) -> None:
    """Make the ``kubernetes`` package (and kopf's login handlers) use ``kubeconfig`` by default.

    ``kubernetes.config`` reads ``$KUBECONFIG`` once, at import time: set the variable before it is imported (the
    integration conftest calls this at import), and patch the module constants when it was imported already.
    """
    os.environ["KUBECONFIG"] = str(kubeconfig)
    for name in ("kubernetes.config.kube_config", "kubernetes.config"):
        mod = sys.modules.get(name)
        if mod is not None and hasattr(mod, "KUBE_CONFIG_DEFAULT_LOCATION"):
            setattr(mod, "KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))  # noqa: B010 - untyped module


def wait_for(fn: Callable[[], T | None], *, timeout: float = 30.0, interval: float = 0.2, what: str = "condition") -> T:
    """Call ``fn`` until it returns something truthy (returned) or ``timeout`` expires (ControlPlaneError).

    Exceptions raised by ``fn`` count as "not yet"; the last one is reported on timeout.
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            result = fn()
            if result:
                return result
        except Exception as exc:  # noqa: BLE001 - polling: every failure means "not yet"
            last_exc = exc
        if time.monotonic() >= deadline:
            raise ControlPlaneError(f"timeout after {timeout:.0f}s waiting for {what}; last error: {last_exc}")
        time.sleep(interval)


def _served_versions(crds: Iterable[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(group, version, plural) of every served version of the given CRD objects."""
    return [
        (c["spec"]["group"], v["name"], c["spec"]["names"]["plural"])
        for c in crds
        for v in c["spec"]["versions"]
        if v.get("served", True)
    ]


def _read_env_file(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            env[key.strip()] = value.strip()
    return env


def _run_script(args: Sequence[str], *, timeout: float, log: Path | None = None) -> str:
    """Run one of scripts/k8s/*.sh; return its output (stdout+stderr); ControlPlaneError on failure."""
    cmd = [str(SCRIPTS / args[0]), *args[1:]]
    try:
        proc = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout if isinstance(exc.stdout, str) else (exc.stdout or b"").decode(errors="replace")
        raise ControlPlaneError(f"{' '.join(cmd)} timed out after {timeout:.0f}s:\n{out}") from exc
    if log is not None:
        with log.open("a") as f:
            f.write(f"$ {' '.join(cmd)}\n{proc.stdout}")
    if proc.returncode != 0:
        raise ControlPlaneError(f"{' '.join(cmd)} failed (rc={proc.returncode}):\n{proc.stdout}")
    return proc.stdout


@dataclass
class Cluster:
    """A running control plane (one work dir). Create it with :meth:`start` or :meth:`attach`."""

    workdir: Path
    server: str
    token: str
    kubeconfig: Path
    ca_file: Path
    kubectl_bin: Path
    env: dict[str, str] = field(repr=False)
    owned: bool = True  # started by us -> stop() stops it
    start_seconds: float = 0.0  # wall time of start()

    # --- life cycle -----------------------------------------------------------------------------------------------
    @classmethod
    def start(
        cls,
        workdir: Path | str,
        groups: Iterable[str] = (),
        *,
        controller_manager: bool = True,
        watch_pid: int | None = None,
        timeout: float = 240.0,
    ) -> Cluster:
        """Start a control plane in ``workdir`` (created; must not host a running one).

        ``groups``: ``"group/version"`` strings routed to the 1.36 server at start (optional: :meth:`apply_crd` does
        it on demand). ``controller_manager=False`` defers kube-controller-manager (see
        :meth:`start_controller_manager`). ``watch_pid``: stop the plane when that process exits (crash safety).
        Raises ControlPlaneError (with the script output) when the binaries are missing or start-up fails; the script
        has then already stopped whatever it had started.
        """
        missing = missing_binaries()
        if missing:
            raise ControlPlaneError(
                "Kubernetes test binaries missing: " + ", ".join(map(str, missing)) + f" -- {SETUP_HINT}"
            )
        workdir = Path(workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        args = ["start-control-plane.sh"]
        if not controller_manager:
            args.append("--no-kcm")
        if watch_pid is not None:
            args += ["--watch-pid", str(watch_pid)]
        args += [str(workdir), *groups]
        t0 = time.monotonic()
        _run_script(args, timeout=timeout, log=workdir / "start.log")
        cluster = cls.attach(workdir, owned=True)
        cluster.start_seconds = time.monotonic() - t0
        return cluster

    @classmethod
    def attach(cls, workdir: Path | str, *, owned: bool = False) -> Cluster:
        """A Cluster for a control plane already running in ``workdir`` (``stop()`` leaves it alone unless owned)."""
        workdir = Path(workdir).resolve()
        env_file = workdir / "cluster.env"
        if not env_file.is_file():
            raise ControlPlaneError(f"{env_file} not found: no control plane was started in {workdir}")
        env = _read_env_file(env_file)
        return cls(
            workdir=workdir,
            server=env["K8S_SERVER"],
            token=env["K8S_TOKEN"],
            kubeconfig=Path(env["KUBECONFIG"]),
            ca_file=Path(env["K8S_CA_FILE"]),
            kubectl_bin=Path(env.get("KUBECTL") or kubectl_binary()),
            env=env,
            owned=owned,
        )

    def stop(self, *, purge: bool = True, timeout: float = 90.0) -> None:
        """Stop all components by PID (KCM, apiext, apiserver waited for, etcd). ``purge`` drops the etcd data."""
        if not self.owned:
            return
        _run_script(
            ["stop-control-plane.sh", *(["--purge"] if purge else []), str(self.workdir)],
            timeout=timeout,
            log=self.workdir / "stop.log",
        )

    def start_controller_manager(self, timeout: float = 90.0) -> None:
        """(Re)start kube-controller-manager.

        Its garbage collector discovers new resource types only every 30 s; restarting it right after installing
        CRDs makes ownerReference GC of (or by) custom resources immediate. Takes ~1 s.
        """
        _run_script(
            ["start-control-plane.sh", "--kcm-only", str(self.workdir)], timeout=timeout, log=self.workdir / "start.log"
        )
        self.env = _read_env_file(self.workdir / "cluster.env")

    restart_controller_manager = start_controller_manager

    def stop_controller_manager(self, timeout: float = 60.0) -> None:
        """Stop kube-controller-manager (no Job controller, no garbage collector) until `start_controller_manager`."""
        _run_script(["stop-control-plane.sh", "--only", "kcm", str(self.workdir)], timeout=timeout,
                    log=self.workdir / "stop.log")

    def is_running(self) -> bool:
        pid_file = self.workdir / "apiserver.pid"
        try:
            os.kill(int(pid_file.read_text().strip()), 0)
        except (OSError, ValueError):
            return False
        return True

    def log_path(self, component: str) -> Path:
        """Log file of ``etcd``, ``apiserver``, ``apiext``, ``kcm`` or ``watchdog``."""
        return self.workdir / f"{component}.log"

    # --- kubectl -------------------------------------------------------------------------------------------------
    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        timeout: float = 60.0,
        kubeconfig: Path | str | None = None,
        namespace: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this cluster (admin unless ``kubeconfig`` is given); return the CompletedProcess.

        ``check=True`` raises :class:`KubectlError` (stderr in the message) on a non-zero exit.
        """
        cmd = [
            str(self.kubectl_bin),
            "--kubeconfig",
            str(kubeconfig or self.kubeconfig),
            "--cache-dir",
            str(self.workdir / "kubectl-cache"),
        ]
        if namespace is not None:
            cmd += ["--namespace", namespace]
        cmd += list(args)
        env = {**os.environ, "KUBECONFIG": str(kubeconfig or self.kubeconfig)}
        proc = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout, env=env, check=False)
        if check and proc.returncode != 0:
            raise KubectlError(proc.returncode, cmd, proc.stdout, proc.stderr)
        return proc

    def kubectl_json(self, *args: str, **kwargs: Any) -> Any:
        """``kubectl <args> -o json``, parsed."""
        return json.loads(self.kubectl(*args, "-o", "json", **kwargs).stdout)

    def helm(
        self, *args: str, major: int = 3, check: bool = True, timeout: float = 180.0
    ) -> subprocess.CompletedProcess[str]:
        """Run helm 3 (``major=4``: helm 4) from the cache against this cluster (admin kubeconfig)."""
        binary = cache_dir() / "tools" / "bin" / ("helm" if major == 3 else f"helm{major}")
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "HELM_CACHE_HOME": str(self.workdir / "helm-cache"),
            "HELM_CONFIG_HOME": str(self.workdir / "helm-config"),
            "HELM_DATA_HOME": str(self.workdir / "helm-data"),
        }
        cmd = [str(binary), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
        if check and proc.returncode != 0:
            raise KubectlError(proc.returncode, cmd, proc.stdout, proc.stderr)
        return proc

    def apply(
        self,
        manifest: str | dict[str, Any] | list[dict[str, Any]],
        *args: str,
        namespace: str | None = None,
        validate: bool = False,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        """``kubectl apply -f -`` of YAML text or object(s). Client-side validation is off by default: kubectl's
        validation uses the 1.20 OpenAPI, which rejects ``x-kubernetes-validations`` in CRDs and newer Job fields."""
        text = (
            manifest
            if isinstance(manifest, str)
            else yaml.safe_dump_all(manifest if isinstance(manifest, list) else [manifest])
        )
        return self.kubectl(
            "apply", f"--validate={'true' if validate else 'false'}", "-f", "-", *args, input=text, namespace=namespace,
            timeout=timeout,
        )

    def get_raw(self, path: str, *, token: str | None = None, timeout: float = 10.0) -> Any:
        """GET ``path`` on the API server (admin token unless ``token``), parsed JSON (urllib: no kubectl start-up)."""
        req = urllib.request.Request(self.server + path, headers={"Authorization": f"Bearer {token or self.token}"})
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        with urllib.request.urlopen(req, context=ctx, timeout=timeout) as resp:
            return json.loads(resp.read())

    def server_version(self) -> str:
        return str(self.get_raw("/version")["gitVersion"])

    def crd_server_version(self) -> str:
        """Version of the apiextensions-apiserver behind the aggregator (queried directly)."""
        req = urllib.request.Request(self.env["APIEXT_URL"] + "/version")
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
            return str(json.loads(resp.read())["gitVersion"])

    # --- CRDs ----------------------------------------------------------------------------------------------------
    def route_api_group(self, group: str, version: str) -> None:
        """Create/update the APIService that sends ``group/version`` to the 1.36 CRD server.

        Do it *before* creating the CRD (apply_crd does): otherwise the 1.20 apiserver's crd-autoregister
        controller may first register the group as Local (served by 1.20, without CEL).
        """
        svc_ns, rest = self.env["APIEXT_SERVICE"].split("/", 1)
        svc_name, port = rest.split(":")
        self.apply(
            {
                "apiVersion": "apiregistration.k8s.io/v1",
                "kind": "APIService",
                "metadata": {"name": f"{version}.{group}", "labels": dict(_ROUTING_LABELS)},
                "spec": {
                    "group": group,
                    "version": version,
                    "groupPriorityMinimum": 1000,
                    "versionPriority": 100,
                    "caBundle": base64.b64encode(self.ca_file.read_bytes()).decode(),
                    "service": {"namespace": svc_ns, "name": svc_name, "port": int(port)},
                },
            }
        )

    def _apiservice_available(self, name: str) -> bool:
        svc = self.get_raw(f"/apis/apiregistration.k8s.io/v1/apiservices/{name}")
        apiext_service = self.env["APIEXT_SERVICE"].split("/")[1].split(":")[0]
        routed = (svc.get("spec", {}).get("service") or {}).get("name") == apiext_service
        conds = {c["type"]: c["status"] for c in svc.get("status", {}).get("conditions", [])}
        return routed and conds.get("Available") == "True"

    def apply_crd(self, path: Path | str, *, timeout: float = 60.0) -> list[str]:
        """Install the CRD(s) in the YAML file ``path`` and wait until their resources are really served.

        Steps: route each served group/version to the 1.36 server (APIService, before the CRD exists);
        ``kubectl apply --validate=false`` (kubectl's client-side validation knows only 1.20's CRD schema and rejects
        ``x-kubernetes-validations``); then :meth:`wait_crds_served`. Returns the CRD names.
        """
        path = Path(path)
        crds = [
            d
            for d in yaml.safe_load_all(path.read_text())
            if isinstance(d, dict) and d.get("kind") == "CustomResourceDefinition"
        ]
        if not crds:
            raise ValueError(f"{path}: no CustomResourceDefinition in it")
        for group, version, _ in _served_versions(crds):
            self.route_api_group(group, version)
        self.kubectl("apply", "--validate=false", "-f", str(path))
        names = [c["metadata"]["name"] for c in crds]
        self.wait_crds_served(*names, timeout=timeout)
        return names

    def wait_crds_served(self, *names: str, timeout: float = 60.0) -> None:
        """Wait until the CRDs ``names`` (already created, e.g. by ``helm install`` from ``crds/``, with their
        groups routed by :meth:`route_api_group` beforehand) are ``Established`` and their resources answer.

        Forces the aggregator to re-check each APIService (otherwise it stays ``FailedDiscoveryCheck`` for up to a
        minute), waits for ``Available``, then until listing each resource through the aggregator succeeds twice in
        a row (the first requests can still get 404/429).
        """
        self.kubectl(
            "wait",
            "--for=condition=Established",
            f"--timeout={int(timeout)}s",
            *[f"crd/{n}" for n in names],
            timeout=timeout + 10,
        )
        served = _served_versions([self.kubectl_json("get", "crd", n) for n in names])
        for group, version in sorted({(g, v) for g, v, _ in served}):
            name = f"{version}.{group}"
            self.kubectl("annotate", "apiservice", name, f"ms2mg.io/recheck={secrets.token_hex(4)}", "--overwrite")
            wait_for(partial(self._apiservice_available, name), timeout=timeout, what=f"APIService {name} Available")
        for group, version, plural in served:

            def listed_twice(g: str = group, v: str = version, p: str = plural) -> bool:
                self.get_raw(f"/apis/{g}/{v}/{p}?limit=1")
                time.sleep(0.1)
                self.get_raw(f"/apis/{g}/{v}/{p}?limit=1")
                return True

            wait_for(listed_twice, timeout=timeout, what=f"{plural}.{group}/{version} served")

    def delete_crd(self, name: str, *, timeout: float = 60.0) -> None:
        """Delete a CRD and the APIServices routing its group (an unavailable APIService breaks discovery, which
        blocks namespace deletion and makes every kubectl call print errors)."""
        crd = self.kubectl_json("get", "crd", name)
        self.kubectl("delete", "crd", name, f"--timeout={int(timeout)}s", timeout=timeout + 10)
        group = crd["spec"]["group"]
        others = [c for c in self.kubectl_json("get", "crd")["items"] if c["spec"]["group"] == group]
        if not others:
            for v in crd["spec"]["versions"]:
                self.kubectl("delete", "apiservice", f"{v['name']}.{group}", "--ignore-not-found")

    # --- namespaces, service accounts, kubeconfigs --------------------------------------------------------------
    def create_namespace(
        self, prefix: str = "t", *, name: str | None = None, labels: dict[str, str] | None = None
    ) -> str:
        """Create a namespace (``<prefix>-<random>`` unless ``name``); return its name."""
        ns = name or f"{prefix}-{secrets.token_hex(3)}"
        meta: dict[str, Any] = {"name": ns}
        if labels:
            meta["labels"] = labels
        self.kubectl("create", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "Namespace", "metadata": meta}))
        return ns

    def delete_namespace(self, name: str, *, wait: bool = False) -> None:
        """Delete a namespace; by default without waiting for the namespace controller to empty it."""
        self.kubectl(
            "delete", "namespace", name, "--ignore-not-found", f"--wait={'true' if wait else 'false'}", timeout=120
        )

    def create_service_account(self, namespace: str, name: str) -> None:
        self.kubectl("create", "serviceaccount", name, namespace=namespace)

    def sa_token(self, namespace: str, name: str, *, duration: str = "1h", create: bool = True) -> str:
        """A bound token for ServiceAccount ``namespace/name`` via the TokenRequest API (``kubectl create token``;
        works on 1.20: the apiserver has --service-account-signing-key-file). ``create``: create the SA if missing.
        (KCM's token controller also fills the legacy ``<sa>-token-*`` Secrets; not needed.)"""
        if create and self.kubectl("get", "serviceaccount", name, namespace=namespace, check=False).returncode:
            self.create_service_account(namespace, name)
        return self.kubectl("create", "token", name, f"--duration={duration}", namespace=namespace).stdout.strip()

    def write_kubeconfig(
        self, token: str, path: Path | str | None = None, *, namespace: str = "default", user: str = "user"
    ) -> Path:
        """Write a kubeconfig for this cluster that authenticates with ``token`` (CA embedded); return its path."""
        if path is None:
            (self.workdir / "kubeconfigs").mkdir(exist_ok=True)
            path = self.workdir / "kubeconfigs" / f"{user}-{secrets.token_hex(3)}.yaml"
        path = Path(path)
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "ms2mg-test",
                    "cluster": {
                        "server": self.server,
                        "certificate-authority-data": base64.b64encode(self.ca_file.read_bytes()).decode(),
                    },
                }
            ],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [
                {"name": "ms2mg-test", "context": {"cluster": "ms2mg-test", "user": user, "namespace": namespace}}
            ],
            "current-context": "ms2mg-test",
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        path.chmod(0o600)
        return path

    def sa_kubeconfig(
        self, namespace: str, name: str, path: Path | str | None = None, *, duration: str = "1h", create: bool = True
    ) -> Path:
        """Kubeconfig acting as ServiceAccount ``namespace/name`` (created if missing), default namespace set."""
        token = self.sa_token(namespace, name, duration=duration, create=create)
        return self.write_kubeconfig(token, path, namespace=namespace, user=f"{namespace}-{name}")

    # --- Python client -------------------------------------------------------------------------------------------
    def api_client(self, kubeconfig: Path | str | None = None) -> Any:
        """A ``kubernetes.client.ApiClient`` for this cluster (imports ``kubernetes`` lazily)."""
        from kubernetes import client, config

        cfg = client.Configuration()
        config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=str(kubeconfig or self.kubeconfig), client_configuration=cfg
        )
        return client.ApiClient(cfg)
