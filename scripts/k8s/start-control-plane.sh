#!/usr/bin/env bash
# Start a local "hybrid" Kubernetes control plane on 127.0.0.1 (free ports chosen at start):
#   etcd 3.5 -> kube-apiserver 1.20.2 (core API + aggregator) -> apiextensions-apiserver 1.36 (CRDs + custom resources,
#   reached through the 1.20 aggregator) -> kube-controller-manager 1.20.2 (GC, Job controller, namespaces, SA tokens).
# No scheduler, no kubelet: pods stay Pending; tests simulate outcomes by patching /status.
#
# Usage: start-control-plane.sh [--no-kcm] [--watch-pid PID] WORKDIR [GROUP/VERSION ...]
#        start-control-plane.sh --kcm-only WORKDIR          (re)start only kube-controller-manager of a running plane
#   GROUP/VERSION  API group versions of custom resources to route to the 1.36 server, e.g. ms2mg.io/v1alpha1
#                  (tests/k8s/cluster.py adds them on demand in apply_crd). Install the CRD soon after: until it
#                  exists the APIService is unavailable, kubectl prints discovery errors and the namespace controller
#                  cannot finish deleting namespaces.
#   --no-kcm       do not start kube-controller-manager (start it later with --kcm-only, e.g. after installing CRDs so
#                  that its garbage collector knows the CR kinds at once instead of after its 30 s rediscovery)
#   --watch-pid P  start a watchdog that runs stop-control-plane.sh when process P exits (pytest crash, SIGKILL)
#
# Writes into WORKDIR: kubeconfig (admin, system:masters), cluster.env (KEY=VALUE: server URL, token, ports, PIDs),
# certs/, {etcd,apiserver,apiext,kcm,watchdog}.pid and .log, etcd-data/, audit-policy.yaml + audit.log
# (requests of ServiceAccounts only).
# Binaries: $MS2MG_CACHE (default /var/cache/ms2mg; build them with scripts/k8s/setup.sh) or the env overrides
# ETCD_BIN, KUBE_APISERVER_BIN, APIEXT_BIN, KCM_BIN, KUBECTL.
# On any failure everything started so far is stopped again and the tail of the failing component's log is printed.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${MS2MG_CACHE:-/var/cache/ms2mg}
TIMEOUT=${MS2MG_K8S_START_TIMEOUT:-90}   # seconds per component

NAME=k8s-start
source "$(dirname "${BASH_SOURCE[0]}")/../lib/log.sh"
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }

NO_KCM=0 KCM_ONLY=0 WATCH_PID=""
while (($#)); do
  case $1 in
    --no-kcm) NO_KCM=1 ;;
    --kcm-only) KCM_ONLY=1 ;;
    --watch-pid) WATCH_PID=${2:?--watch-pid needs a PID}; shift ;;
    -h | --help) usage ;;
    --) shift; break ;;
    -*) die "unknown option $1" ;;
    *) break ;;
  esac
  shift
done
(($#)) || usage
W=$(realpath -m "$1")
shift
GROUPS_TO_ROUTE=("$@")
for gv in "${GROUPS_TO_ROUTE[@]}"; do [[ $gv == ?*/?* ]] || die "expected GROUP/VERSION, got '$gv'"; done

ETCD=${ETCD_BIN:-$CACHE/k8s-new/etcd}
KAS=${KUBE_APISERVER_BIN:-$CACHE/k8s-1.20.2/kube-apiserver}
APIEXT=${APIEXT_BIN:-$CACHE/k8s-new/apiextensions-apiserver}
KCM=${KCM_BIN:-$CACHE/k8s-1.20.2/kube-controller-manager}
KUBECTL=${KUBECTL:-$CACHE/tools/bin/kubectl}
for b in "$ETCD" "$KAS" "$APIEXT" "$KCM" "$KUBECTL"; do
  [[ -x $b ]] || die "missing binary $b -- run scripts/k8s/setup.sh (MS2MG_CACHE=$CACHE)"
done
for c in openssl curl python3 setsid; do command -v "$c" >/dev/null || die "missing tool: $c"; done

C=$W/certs
alive() { [[ -s $W/$1.pid ]] && kill -0 "$(cat "$W/$1.pid")" 2>/dev/null; }

# start_daemon NAME CMD... : own session (a Ctrl-C in the terminal must not hit it: teardown order matters),
# stdin from /dev/null, output to NAME.log (never inherit the caller's pipes, or subprocess.run() would hang)
start_daemon() {
  local name=$1; shift
  setsid "$@" </dev/null >"$W/$name.log" 2>&1 &
  echo $! >"$W/$name.pid"
}

# wait_until NAME DESCRIPTION CMD... : poll CMD until it succeeds; fail if NAME's process dies or on timeout
wait_until() {
  local name=$1 what=$2 t; shift 2; t=$(_us)
  local deadline=$((SECONDS + TIMEOUT))
  until "$@" >/dev/null 2>&1; do
    if ! alive "$name"; then
      log "$name exited; last lines of $W/$name.log:"; tail -25 "$W/$name.log" >&2 || true
      die "$name died while waiting for $what"
    fi
    if ((SECONDS >= deadline)); then
      log "last lines of $W/$name.log:"; tail -25 "$W/$name.log" >&2 || true
      die "timeout (${TIMEOUT}s) waiting for $what"
    fi
    sleep 0.2
  done
  log "$what after $(_el "$t")"
}

# ---------------------------------------------------------------------------------------------------------------------
start_kcm() {
  if alive kcm; then
    log "stopping running kube-controller-manager (pid $(cat "$W/kcm.pid"))"
    "$HERE/stop-control-plane.sh" --only kcm "$W"
  fi
  start_daemon kcm "$KCM" \
    --kubeconfig="$W/kubeconfig" --authentication-kubeconfig="$W/kubeconfig" --authorization-kubeconfig="$W/kubeconfig" \
    --bind-address=127.0.0.1 --secure-port="$KCM_PORT" --port=0 --cert-dir="$C/kcm" \
    --leader-elect=false --use-service-account-credentials=false \
    --service-account-private-key-file="$C/sa.key" --root-ca-file="$C/ca.crt" \
    --controllers='*,-nodeipam,-nodelifecycle,-ttl,-bootstrapsigner,-tokencleaner,-csrsigning' \
    --feature-gates=TTLAfterFinished=true --profiling=false
  wait_until kcm "kube-controller-manager healthy (:$KCM_PORT, pid $(cat "$W/kcm.pid"))" \
    curl -fsk --max-time 2 "https://127.0.0.1:$KCM_PORT/healthz"
  sed -i '/^KCM_PID=/d' "$W/cluster.env"
  echo "KCM_PID=$(cat "$W/kcm.pid")" >>"$W/cluster.env"
}

if ((KCM_ONLY)); then
  [[ -s $W/cluster.env ]] || die "$W has no cluster.env: start the control plane first"
  alive apiserver || die "kube-apiserver of $W is not running"
  KCM_PORT=$(sed -n 's/^KCM_PORT=//p' "$W/cluster.env")
  start_kcm
  log "kube-controller-manager (re)started in $(_el "$T_START")"
  exit 0
fi

# ---------------------------------------------------------------------------------------------------------------------
for n in etcd apiserver apiext kcm; do alive "$n" && die "$W: $n is already running (pid $(cat "$W/$n.pid")); stop it first"; done
mkdir -p "$W"
rm -rf "$W/etcd-data" "$C" "$W"/*.pid "$W/cluster.env"
mkdir -p "$W/etcd-data" "$C/kcm" "$W/kubectl-cache"
chmod 700 "$W/etcd-data"

on_error() {
  local rc=$?
  ((rc == 0)) && return
  log "start failed (rc=$rc) after $(_el "$T_START"); stopping what was started (logs stay in $W)"
  "$HERE/stop-control-plane.sh" "$W" >&2 || true
}
trap on_error EXIT

# five free loopback ports (bound together so they differ; tiny race with other port users, fine for tests)
read -r P_ETCD P_PEER P_KAS P_APIEXT KCM_PORT < <(python3 -c '
import socket
ss = [socket.socket() for _ in range(5)]
for s in ss: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in ss])')
SERVER=https://127.0.0.1:$P_KAS
APIEXT_SVC=apiext-crd-server

# --- certificates (EC P-256: fast) ------------------------------------------------------------------------------------
t=$(_us)
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
ca() { # ca NAME CN
  key "$C/$1.key"
  openssl req -x509 -new -key "$C/$1.key" -subj "/CN=$2" -days 3650 -out "$C/$1.crt" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign,digitalSignature 2>/dev/null
}
leaf() { # leaf NAME CA SUBJECT EXTENSIONS
  key "$C/$1.key"
  openssl req -new -key "$C/$1.key" -subj "$3" 2>/dev/null |
    openssl x509 -req -CA "$C/$2.crt" -CAkey "$C/$2.key" -CAcreateserial -days 3650 -out "$C/$1.crt" \
      -extfile <(printf '%s\n' "$4") 2>/dev/null
}
ca ca ms2mg-test-ca
ca front-proxy-ca ms2mg-test-front-proxy-ca
SERVER_EXT="basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth"
leaf apiserver ca /CN=kube-apiserver "$SERVER_EXT
subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
leaf apiext ca /CN=apiextensions-apiserver "$SERVER_EXT
subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:$APIEXT_SVC.kube-system.svc"
leaf front-proxy-client front-proxy-ca /CN=front-proxy-client "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
# kube-apiserver -> kubelet (pods/log, exec, ...): the apiserver presents this client cert and verifies the kubelet's
# serving cert against the cluster CA; tests/k8s/kubelet.py (the fake kubelet) signs its serving cert with ca.key
leaf kubelet-client ca "/O=system:masters/CN=kube-apiserver-kubelet-client" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
key "$C/sa.key"
openssl pkey -in "$C/sa.key" -pubout -out "$C/sa.pub" 2>/dev/null
TOKEN=$(openssl rand -hex 24)
echo "$TOKEN,admin,admin,system:masters" >"$C/tokens.csv"
chmod 600 "$C"/*.key "$C/tokens.csv"
log "certificates and keys in $(_el "$t")"

# audit: only requests of ServiceAccounts (metadata level), so tests can list the verbs an operator running with a
# ServiceAccount token really used; the admin token, KCM and the aggregator's own traffic are not logged
cat >"$W/audit-policy.yaml" <<EOF
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
  userGroups: [system:serviceaccounts]
- level: None
EOF

cat >"$W/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: ms2mg-test
  cluster:
    server: $SERVER
    certificate-authority-data: $(base64 -w0 <"$C/ca.crt")
users:
- name: admin
  user:
    token: $TOKEN
contexts:
- name: ms2mg-test
  context: {cluster: ms2mg-test, user: admin, namespace: default}
current-context: ms2mg-test
EOF
chmod 600 "$W/kubeconfig"

# --- etcd -------------------------------------------------------------------------------------------------------------
start_daemon etcd "$ETCD" --name default --data-dir "$W/etcd-data" \
  --listen-client-urls "http://127.0.0.1:$P_ETCD" --advertise-client-urls "http://127.0.0.1:$P_ETCD" \
  --listen-peer-urls "http://127.0.0.1:$P_PEER" --initial-advertise-peer-urls "http://127.0.0.1:$P_PEER" \
  --initial-cluster "default=http://127.0.0.1:$P_PEER" --unsafe-no-fsync --log-level warn
wait_until etcd "etcd healthy (:$P_ETCD, pid $(cat "$W/etcd.pid"))" \
  curl -fs --max-time 2 "http://127.0.0.1:$P_ETCD/health"

# --- kube-apiserver 1.20.2 (core API, RBAC, aggregator with front-proxy client cert) --------------------------------
start_daemon apiserver "$KAS" \
  --etcd-servers="http://127.0.0.1:$P_ETCD" --bind-address=127.0.0.1 --advertise-address=127.0.0.1 \
  --secure-port="$P_KAS" --insecure-port=0 --tls-cert-file="$C/apiserver.crt" --tls-private-key-file="$C/apiserver.key" \
  --client-ca-file="$C/ca.crt" --token-auth-file="$C/tokens.csv" --authorization-mode=RBAC \
  --service-account-issuer=https://kubernetes.default.svc.cluster.local \
  --service-account-key-file="$C/sa.pub" --service-account-signing-key-file="$C/sa.key" \
  --service-cluster-ip-range=10.0.0.0/24 --endpoint-reconciler-type=none \
  --disable-admission-plugins=ServiceAccount --allow-privileged=true --profiling=false \
  --feature-gates=TTLAfterFinished=true \
  --requestheader-client-ca-file="$C/front-proxy-ca.crt" --requestheader-allowed-names=front-proxy-client \
  --requestheader-username-headers=X-Remote-User --requestheader-group-headers=X-Remote-Group \
  --requestheader-extra-headers-prefix=X-Remote-Extra- \
  --proxy-client-cert-file="$C/front-proxy-client.crt" --proxy-client-key-file="$C/front-proxy-client.key" \
  --kubelet-certificate-authority="$C/ca.crt" --kubelet-client-certificate="$C/kubelet-client.crt" \
  --kubelet-client-key="$C/kubelet-client.key" --kubelet-preferred-address-types=InternalIP,Hostname \
  --audit-policy-file="$W/audit-policy.yaml" --audit-log-path="$W/audit.log" --audit-log-format=json
# /readyz includes the autoregister-completion hook: after it, the one-time "onstart" sync of the built-in
# APIServices is over and our re-routing of apiextensions.k8s.io below is not reset
wait_until apiserver "kube-apiserver 1.20 ready ($SERVER, pid $(cat "$W/apiserver.pid"))" \
  curl -fs --max-time 2 --cacert "$C/ca.crt" -H "Authorization: Bearer $TOKEN" "$SERVER/readyz"

# --- apiextensions-apiserver 1.36 (its own etcd prefix; core API, authn and authz delegated to the 1.20 server) -----
start_daemon apiext "$APIEXT" \
  --etcd-servers="http://127.0.0.1:$P_ETCD" --etcd-prefix=/registry-apiext-new \
  --bind-address=127.0.0.1 --secure-port="$P_APIEXT" \
  --tls-cert-file="$C/apiext.crt" --tls-private-key-file="$C/apiext.key" \
  --kubeconfig="$W/kubeconfig" --authentication-kubeconfig="$W/kubeconfig" --authorization-kubeconfig="$W/kubeconfig" \
  --enable-priority-and-fairness=false \
  --disable-admission-plugins=ValidatingAdmissionPolicy,MutatingAdmissionPolicy --profiling=false
wait_until apiext "apiextensions-apiserver ready (https://127.0.0.1:$P_APIEXT, pid $(cat "$W/apiext.pid"))" \
  curl -fs --max-time 2 --cacert "$C/ca.crt" "https://127.0.0.1:$P_APIEXT/readyz"

# --- routing: 1.20 aggregator -> 1.36 for apiextensions.k8s.io/v1 and the CR groups ----------------------------------
# ExternalName -> localhost is the only route the 1.20 aggregator accepts for a loopback backend (Endpoints reject
# loopback IPs, there is no kube-proxy). The label "automanaged=false" keeps the 1.20 autoregister/crd-registration
# controllers from resetting these APIServices to Local.
K=("$KUBECTL" --kubeconfig "$W/kubeconfig" --cache-dir "$W/kubectl-cache")
apiservice_yaml() { # GROUP VERSION
  cat <<EOF
---
apiVersion: apiregistration.k8s.io/v1
kind: APIService
metadata:
  name: $2.$1
  labels: {kube-aggregator.kubernetes.io/automanaged: "false", ms2mg.io/test-routing: apiext}
spec:
  group: $1
  version: $2
  groupPriorityMinimum: $([[ $1 == apiextensions.k8s.io ]] && echo 16700 || echo 1000)
  versionPriority: 100
  caBundle: $(base64 -w0 <"$C/ca.crt")
  service: {namespace: kube-system, name: $APIEXT_SVC, port: $P_APIEXT}
EOF
}
t=$(_us)
{
  cat <<EOF
apiVersion: v1
kind: Service
metadata: {name: $APIEXT_SVC, namespace: kube-system}
spec:
  type: ExternalName
  externalName: localhost
  ports: [{name: https, port: $P_APIEXT, protocol: TCP}]
EOF
  apiservice_yaml apiextensions.k8s.io v1
  for gv in "${GROUPS_TO_ROUTE[@]}"; do apiservice_yaml "${gv%/*}" "${gv#*/}"; done
} >"$W/routing.yaml"
"${K[@]}" apply -f "$W/routing.yaml" >>"$W/routing.log" 2>&1 || { cat "$W/routing.log" >&2; die "kubectl apply routing.yaml failed"; }
routed() { # the APIService points to our service and is Available
  [[ $("${K[@]}" get apiservice v1.apiextensions.k8s.io -o \
    'jsonpath={.spec.service.name}/{.status.conditions[?(@.type=="Available")].status}') == "$APIEXT_SVC/True" ]]
}
wait_until apiserver "apiextensions.k8s.io/v1 routed to the 1.36 server" routed
log "routing applied in $(_el "$t") (groups: apiextensions.k8s.io/v1${GROUPS_TO_ROUTE[*]:+ ${GROUPS_TO_ROUTE[*]}})"

{
  echo "MS2MG_K8S_WORKDIR=$W"
  echo "KUBECONFIG=$W/kubeconfig"
  echo "K8S_SERVER=$SERVER"
  echo "K8S_TOKEN=$TOKEN"
  echo "K8S_CA_FILE=$C/ca.crt"
  echo "K8S_CA_KEY=$C/ca.key"
  echo "AUDIT_LOG=$W/audit.log"
  echo "ETCD_URL=http://127.0.0.1:$P_ETCD"
  echo "APIEXT_URL=https://127.0.0.1:$P_APIEXT"
  echo "APIEXT_SERVICE=kube-system/$APIEXT_SVC:$P_APIEXT"
  echo "KCM_PORT=$KCM_PORT"
  echo "KUBECTL=$KUBECTL"
  echo "ROUTED_GROUPS=${GROUPS_TO_ROUTE[*]}"
  echo "ETCD_PID=$(cat "$W/etcd.pid")"
  echo "APISERVER_PID=$(cat "$W/apiserver.pid")"
  echo "APIEXT_PID=$(cat "$W/apiext.pid")"
} >"$W/cluster.env"

((NO_KCM)) || start_kcm

if [[ -n $WATCH_PID ]]; then
  kill -0 "$WATCH_PID" 2>/dev/null || die "--watch-pid $WATCH_PID: no such process"
  # shellcheck disable=SC2016 # the inner script gets its values as $1..$3
  start_daemon watchdog bash -c 'while kill -0 "$1" 2>/dev/null && [[ -e $2/etcd.pid ]]; do sleep 1; done
    [[ -e $2/etcd.pid ]] && echo "watched pid $1 is gone: stopping the control plane" && exec "$3" --purge "$2"' \
    watchdog "$WATCH_PID" "$W" "$HERE/stop-control-plane.sh"
  echo "WATCHDOG_PID=$(cat "$W/watchdog.pid")" >>"$W/cluster.env"
fi

trap - EXIT
log "control plane ready in $(_el "$T_START"): $SERVER  KUBECONFIG=$W/kubeconfig  logs: $W/*.log"
