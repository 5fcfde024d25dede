#!/usr/bin/env bash
# Starts a real single-node Kubernetes cluster on 127.0.0.1 whose kubelet runs every container
# through `pullgate serve` (both CRI endpoints on pullgate's socket), all in one temp dir:
#   etcd, kube-apiserver (self-signed PKI, RBAC+Node), kube-controller-manager, kube-scheduler,
#   docker-registry (busybox images pushed with skopeo), containerd 1.6 (Debian),
#   pullgate serve in cluster mode (--kubeconfig), kubelet.
# Prints the cluster dir on the last line of stdout; `tests/cluster/down.sh DIR` stops it all.
# Peers come from tests/testbed/install.sh's cache (PULLGATE_TESTBED_BIN, default
# /var/cache/pullgate-testbed/bin); pullgate from PULLGATE_BIN (default $CARGO_TARGET_DIR/debug/pullgate).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
BIN=${PULLGATE_TESTBED_BIN:-/var/cache/pullgate-testbed/bin}
PULLGATE=${PULLGATE_BIN:-${CARGO_TARGET_DIR:-$REPO/target}/debug/pullgate}
NODE=${PULLGATE_CLUSTER_NODE:-pgnode}
# kubectl of the same release, built by install.sh; else the one on PATH.
KUBECTL=${KUBECTL:-$BIN/kubectl}
[ -x "$KUBECTL" ] || KUBECTL=$(command -v kubectl || echo "$BIN/kubectl")
for b in etcd kube-apiserver kube-controller-manager kube-scheduler kubelet; do
  [ -x "$BIN/$b" ] || { echo "missing $BIN/$b: run tests/testbed/install.sh" >&2; exit 2; }
done
[ -x "$KUBECTL" ] || { echo "no kubectl: run tests/testbed/install.sh" >&2; exit 2; }
[ -x "$PULLGATE" ] || { echo "missing $PULLGATE: cargo build --bin pullgate" >&2; exit 2; }

D=${PULLGATE_CLUSTER_DIR:-$(mktemp -d /tmp/pgk-XXXXXX)}
mkdir -p "$D"/{pki,logs,etcd,kubelet,pod-logs,cni,registry}
: > "$D/pids"
T0=$(date +%s.%N)
log() { printf '[%6.1fs] %s\n' "$(echo "$(date +%s.%N) - $T0" | bc)" "$*" >&2; }
fail() { log "FAILED: $*"; echo "$D"; exit 1; }
start() { # name cmd...  (background, pid recorded, output in logs/NAME.log)
  local name=$1; shift
  "$@" >"$D/logs/$name.log" 2>&1 &
  echo "$name $!" >> "$D/pids"
}
wait_for() { # seconds description cmd...
  local secs=$1 what=$2; shift 2
  local end=$(( $(date +%s) + secs ))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$end" ] || fail "timed out after ${secs}s waiting for $what"
    sleep 0.5
  done
  log "$what"
}
read -r P_ETCD P_PEER P_API P_KCM P_SCHED P_REG P_KUBELET P_KHEALTH P_PGHEALTH P_ADM < <(python3 - <<'PY'
import socket
ss = [socket.socket() for _ in range(10)]
for s in ss: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in ss))
PY
)
echo "API=https://127.0.0.1:$P_API ADMISSION=https://127.0.0.1:$P_ADM REGISTRY=127.0.0.1:$P_REG NODE=$NODE KUBECTL=$KUBECTL" > "$D/env"

# --- PKI: one CA; apiserver serving cert; admin client cert (system:masters) used by every
# component; service-account signing key pair.
P=$D/pki
openssl_q() { openssl "$@" 2>>"$D/logs/openssl.log"; }
openssl_q req -x509 -newkey rsa:2048 -nodes -keyout "$P/ca.key" -out "$P/ca.crt" -days 2 -subj "/CN=pullgate-test-ca"
cat > "$P/api.ext" <<EXT
subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc
extendedKeyUsage=serverAuth
EXT
openssl_q req -newkey rsa:2048 -nodes -keyout "$P/api.key" -out "$P/api.csr" -subj "/CN=kube-apiserver"
openssl_q x509 -req -in "$P/api.csr" -CA "$P/ca.crt" -CAkey "$P/ca.key" -CAcreateserial -out "$P/api.crt" -days 2 -extfile "$P/api.ext"
printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' > "$P/adm.ext"
openssl_q req -newkey rsa:2048 -nodes -keyout "$P/adm.key" -out "$P/adm.csr" -subj "/CN=pullgate-admission"
openssl_q x509 -req -in "$P/adm.csr" -CA "$P/ca.crt" -CAkey "$P/ca.key" -CAcreateserial -out "$P/adm.crt" -days 2 -extfile "$P/adm.ext"
echo "extendedKeyUsage=clientAuth" > "$P/client.ext"
openssl_q req -newkey rsa:2048 -nodes -keyout "$P/admin.key" -out "$P/admin.csr" -subj "/O=system:masters/CN=admin"
openssl_q x509 -req -in "$P/admin.csr" -CA "$P/ca.crt" -CAkey "$P/ca.key" -CAcreateserial -out "$P/admin.crt" -days 2 -extfile "$P/client.ext"
openssl_q genrsa -out "$P/sa.key" 2048
openssl_q rsa -in "$P/sa.key" -pubout -out "$P/sa.pub"
cat > "$D/admin.kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters: [{name: local, cluster: {server: "https://127.0.0.1:$P_API", certificate-authority: "$P/ca.crt"}}]
users: [{name: admin, user: {client-certificate: "$P/admin.crt", client-key: "$P/admin.key"}}]
contexts: [{name: local, context: {cluster: local, user: admin}}]
current-context: local
KC
KC=$D/admin.kubeconfig
log "PKI and kubeconfig written"

# --- etcd, API server, controller manager, scheduler.
start etcd "$BIN/etcd" --name pg --data-dir "$D/etcd" \
  --listen-client-urls "http://127.0.0.1:$P_ETCD" --advertise-client-urls "http://127.0.0.1:$P_ETCD" \
  --listen-peer-urls "http://127.0.0.1:$P_PEER" --initial-advertise-peer-urls "http://127.0.0.1:$P_PEER" \
  --initial-cluster "pg=http://127.0.0.1:$P_PEER" --log-level warn
start kube-apiserver "$BIN/kube-apiserver" --etcd-servers "http://127.0.0.1:$P_ETCD" \
  --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$P_API" \
  --cert-dir "$D/pki/apiserver" --tls-cert-file "$P/api.crt" --tls-private-key-file "$P/api.key" \
  --client-ca-file "$P/ca.crt" --authorization-mode Node,RBAC \
  --service-account-key-file "$P/sa.pub" --service-account-signing-key-file "$P/sa.key" \
  --service-account-issuer https://kubernetes.default.svc --service-cluster-ip-range 10.0.0.0/24 \
  --kubelet-client-certificate "$P/admin.crt" --kubelet-client-key "$P/admin.key" \
  --enable-priority-and-fairness=false
wait_for 60 "API server ready" "$KUBECTL" --kubeconfig "$KC" get --raw /readyz
start kube-controller-manager "$BIN/kube-controller-manager" --kubeconfig "$KC" \
  --authentication-kubeconfig "$KC" --authorization-kubeconfig "$KC" \
  --bind-address 127.0.0.1 --secure-port "$P_KCM" --leader-elect=false \
  --service-account-private-key-file "$P/sa.key" --root-ca-file "$P/ca.crt" \
  --cluster-signing-cert-file "$P/ca.crt" --cluster-signing-key-file "$P/ca.key" \
  --use-service-account-credentials=false
start kube-scheduler "$BIN/kube-scheduler" --kubeconfig "$KC" \
  --authentication-kubeconfig "$KC" --authorization-kubeconfig "$KC" \
  --bind-address 127.0.0.1 --secure-port "$P_SCHED" --leader-elect=false

# --- Registry with busybox images: the sandbox (pause) image and two app repos.
cat > "$D/registry/config.yml" <<YML
version: 0.1
storage: {filesystem: {rootdirectory: $D/registry/data}, delete: {enabled: true}}
http: {addr: 127.0.0.1:$P_REG}
log: {level: warn}
YML
start registry docker-registry serve "$D/registry/config.yml"
echo '{"default":[{"type":"insecureAcceptAnything"}]}' > "$D/registry/policy.json"
wait_for 20 "registry ready" curl -sf "http://127.0.0.1:$P_REG/v2/"
# pause and allowed/app share one image; unlisted/app and signed/app differ from it (a seed file),
# so their digests are verified on their own.
for spec in pause: allowed/app: unlisted/app:unlisted signed/app:signed; do
  repo=${spec%%:*} seed=${spec#*:}
  layout=$D/registry/oci-${seed:-base}
  [ -d "$layout" ] || python3 "$HERE/mkimage.py" "$layout" v1 $seed > "$layout.digest"
  skopeo --policy "$D/registry/policy.json" copy -q --dest-tls-verify=false \
    "oci:$layout:v1" "docker://127.0.0.1:$P_REG/$repo:v1" >>"$D/logs/skopeo.log" 2>&1 \
    || fail "skopeo push $repo (see $D/logs/skopeo.log)"
done
log "pushed pause, allowed/app, unlisted/app, signed/app (busybox) to 127.0.0.1:$P_REG"

# --- containerd 1.6 (Debian), configured like tests/common/containerd.rs, plus a CNI config
# so the runtime reports NetworkReady (kubelet keeps the node NotReady otherwise).
SNAP=native
mkdir -p "$D/ovl"/{l,u,w,m}
if mount -t overlay overlay -o "lowerdir=$D/ovl/l,upperdir=$D/ovl/u,workdir=$D/ovl/w" "$D/ovl/m" 2>/dev/null; then
  umount "$D/ovl/m"; SNAP=overlayfs
fi
cat > "$D/cni/10-pg.conflist" <<CNI
{"cniVersion": "0.4.0", "name": "pg", "plugins": [{"type": "bridge", "bridge": "pgbr0",
 "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.88.0.0/16"}]]}}]}
CNI
cat > "$D/containerd.toml" <<TOML
version = 2
root = "$D/ctd/root"
state = "$D/ctd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "$D/containerd.sock"
[ttrpc]
  address = "$D/containerd-ttrpc.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "127.0.0.1:$P_REG/pause:v1"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "$SNAP"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$D/cni"
TOML
start containerd containerd --config "$D/containerd.toml"
wait_for 30 "containerd ready ($SNAP)" ctr --address "$D/containerd.sock" version

# --- pullgate: CRDs, then serve in cluster mode.
"$KUBECTL" --kubeconfig "$KC" apply -f "$REPO/deploy/crds/" >>"$D/logs/kubectl.log" 2>&1 || fail "apply CRDs"
"$KUBECTL" --kubeconfig "$KC" wait --for condition=established --timeout=30s \
  crd/clusterimagepolicies.policy.sigstore.dev >>"$D/logs/kubectl.log" 2>&1 || fail "CRD established"
# pullgate reads the API server as its own ServiceAccount (deploy/rbac.yaml's pullgate-node),
# with a bound token from the TokenRequest API, never as admin.
# The node account reads no Secret: key Secrets reach it as public keys the admission shim
# projects into ConfigMap cosign-system/pullgate-public-keys (deploy/public-keys.yaml).
"$KUBECTL" --kubeconfig "$KC" apply -f "$REPO/deploy/namespace.yaml" -f "$REPO/deploy/rbac.yaml" \
  -f "$REPO/deploy/public-keys.yaml" \
  >>"$D/logs/kubectl.log" 2>&1 || fail "apply deploy/namespace.yaml, rbac.yaml, public-keys.yaml"
sa_kubeconfig() { # SERVICEACCOUNT -> $D/SERVICEACCOUNT.kubeconfig
  local token
  token=$("$KUBECTL" --kubeconfig "$KC" -n pullgate-system create token "$1" --duration 2h) \
    || fail "token for $1"
  cat > "$D/$1.kubeconfig" <<KC2
apiVersion: v1
kind: Config
clusters: [{name: local, cluster: {server: "https://127.0.0.1:$P_API", certificate-authority: "$P/ca.crt"}}]
users: [{name: $1, user: {token: "$token"}}]
contexts: [{name: local, context: {cluster: local, user: $1}}]
current-context: local
KC2
}
sa_kubeconfig pullgate-node
sa_kubeconfig pullgate-admission
start pullgate "$PULLGATE" serve --kubeconfig "$D/pullgate-node.kubeconfig" --listen "$D/pullgate.sock" \
  --containerd "$D/containerd.sock" --audit-log "$D/audit.log" --snapshot-file "$D/snapshot.json" \
  --health-listen "127.0.0.1:$P_PGHEALTH" --node-name "$NODE" --deny-cache-ttl 1
wait_for 30 "pullgate serving (socket bound)" test -S "$D/pullgate.sock"
wait_for 30 "pullgate policy snapshot fresh" curl -sf "http://127.0.0.1:$P_PGHEALTH/readyz"

# --- the admission shim on loopback, as pullgate-admission, and deploy/admission.yaml's webhook
# configurations with `url:` to it instead of the in-cluster Service.
start admission "$PULLGATE" admission --kubeconfig "$D/pullgate-admission.kubeconfig" \
  --tls-cert "$P/adm.crt" --tls-key "$P/adm.key" --listen "127.0.0.1:$P_ADM" \
  --audit-log "$D/audit-admission.log" --node-name admission
wait_for 30 "admission shim ready" curl -sf --cacert "$P/ca.crt" "https://127.0.0.1:$P_ADM/readyz"
python3 - "$REPO/deploy/admission.yaml" "https://127.0.0.1:$P_ADM" "$(base64 -w0 < "$P/ca.crt")" \
  > "$D/webhooks.yaml" <<'PY'
import re, sys
src, base, ca = sys.argv[1:4]
docs = re.split(r"(?m)^---\s*$", open(src).read())
keep = [d for d in docs if re.search(r"(?m)^kind: (Validating|Mutating)WebhookConfiguration", d)]
assert len(keep) == 2, "deploy/admission.yaml: want 2 webhook configurations"
svc = re.compile(r"(?m)^(\s*)service:\n\s*name: \S+\n\s*namespace: \S+\n\s*path: (\S+)\n\s*port: \d+\n")
out = []
for d in keep:
    d, n = svc.subn(lambda m: f"{m.group(1)}url: {base}{m.group(2)}\n{m.group(1)}caBundle: {ca}\n", d)
    assert n >= 1
    out.append(d)
print("---".join(out))
PY
"$KUBECTL" --kubeconfig "$KC" apply -f "$D/webhooks.yaml" >>"$D/logs/kubectl.log" 2>&1 || fail "register webhooks"
log "webhooks registered by url: at the admission shim"

# --- kubelet with both CRI endpoints on pullgate.
cat > "$D/kubelet.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
containerRuntimeEndpoint: unix://$D/pullgate.sock
imageServiceEndpoint: unix://$D/pullgate.sock
cgroupDriver: cgroupfs
failSwapOn: false
oomScoreAdj: 0
address: 127.0.0.1
port: $P_KUBELET
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $P_KHEALTH
podLogsDir: $D/pod-logs
resolvConf: /etc/resolv.conf
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $P/ca.crt}
authorization: {mode: Webhook}
evictionHard: {memory.available: "1Mi", nodefs.available: "1%", imagefs.available: "1%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
registerNode: true
YAML
start kubelet "$BIN/kubelet" --config "$D/kubelet.yaml" --kubeconfig "$KC" \
  --root-dir "$D/kubelet" --cert-dir "$D/kubelet/pki" --hostname-override "$NODE" -v 2
wait_for 120 "node $NODE Ready" "$KUBECTL" --kubeconfig "$KC" wait --for condition=Ready --timeout=2s "node/$NODE"
log "cluster up in $D"
echo "$D"
