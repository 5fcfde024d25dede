#!/usr/bin/env bash
# Runs the seed walkthrough on a cluster started by tests/cluster/up.sh, with a real kubelet:
#  1. namespace `demo` labelled policy.sigstore.dev/include=true, an allow-list CIP
#     (REGISTRY/allowed/**, static pass);
#  2. admission: a pod of REGISTRY/unlisted/app:v1 is refused by the webhook at apply time;
#  3. the workload webhook narrowed (README's bypass step): the hostNetwork pod of the allow-listed
#     image reaches Running; the unlisted one is refused by the node (SignatureValidationFailed);
#  4. bypasses: with unlisted/app:v1 pulled on the node through the unenforced namespace `dev`,
#     pods in `demo` with IfNotPresent, Never and the bare image ID are not created
#     (CreateContainerError, event "Error: SignatureValidationFailed: …");
#  5. a key CIP (secretRef) for REGISTRY/signed/**: the unsigned image is refused; after
#     `cosign sign --key` a new pod of it runs;
#  6. the audit logs: one JSON line per decision, from every front door.
# Exit 0 when all hold; prints what it saw otherwise.
set -euo pipefail
D=${1:?usage: prove.sh CLUSTER_DIR}
. "$D/env"
BIN=${PULLGATE_TESTBED_BIN:-/var/cache/pullgate-testbed/bin}
K() { "$KUBECTL" --kubeconfig "$D/admin.kubeconfig" "$@"; }
T0=$(date +%s.%N)
log() { printf '[%6.1fs] %s\n' "$(echo "$(date +%s.%N) - $T0" | bc)" "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }
until_ok() { # seconds what cmd...
  local secs=$1 what=$2; shift 2
  local end=$(( $(date +%s) + secs ))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$end" ] || die "timed out after ${secs}s: $what"
    sleep 0.5
  done
}
pod() { # name namespace image [pullPolicy]
  cat <<YAML
apiVersion: v1
kind: Pod
metadata: {name: $1, namespace: $2}
spec:
  hostNetwork: true
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: 1
  containers:
  - name: app
    image: "$3"
    imagePullPolicy: ${4:-Always}
    command: ["/bin/sleep", "3600"]
YAML
}
running() { K -n "$2" wait --for=jsonpath='{.status.phase}'=Running --timeout=90s "pod/$1" >/dev/null \
  || { K -n "$2" describe pod "$1" >&2; die "pod $2/$1 did not reach Running"; }; }
events_of() { K -n "$2" get events --field-selector "involvedObject.name=$1" \
  -o jsonpath='{range .items[*]}{.reason}{"\t"}{.message}{"\n"}{end}'; }
expect_event() { # pod namespace grep-pattern what
  local end=$(( $(date +%s) + 60 ))
  until events_of "$1" "$2" | grep -q -- "$3"; do
    if [ "$(date +%s)" -ge "$end" ]; then
      K -n "$2" describe pod "$1" >&2; die "pod $2/$1: no event matching '$3' ($4)"
    fi
    sleep 0.5
  done
  local phase; phase=$(K -n "$2" get pod "$1" -o jsonpath='{.status.phase}')
  [ "$phase" = Pending ] || die "pod $2/$1 is $phase, want Pending"
  log "pod $1: $4: $(events_of "$1" "$2" | grep -- "$3" | head -1 | cut -f2 | cut -c1-200)"
}
snapshot_has() { grep -q -- "$1" "$D/snapshot.json"; }

# --- 1. namespace and allow-list
K apply -f - >/dev/null <<YAML
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {policy.sigstore.dev/include: "true"}}
---
apiVersion: policy.sigstore.dev/v1beta1
kind: ClusterImagePolicy
metadata: {name: allow-listed}
spec:
  images: [{glob: "$REGISTRY/allowed/**"}]
  authorities: [{static: {action: pass}}]
YAML
until_ok 30 "pullgate's snapshot has the CIP and namespace" eval 'snapshot_has allow-listed && snapshot_has "\"demo\""'
until_ok 30 "default ServiceAccount in demo" K -n demo get serviceaccount default
log "namespace demo (include=true) and CIP allow-listed synced by pullgate"

# --- 2. the webhook refuses the unlisted image at apply time
until_ok 30 "the webhook admits the allow-listed pod" eval "pod allowed demo '$REGISTRY/allowed/app:v1' | K apply -f -"
if out=$(pod unlisted demo "$REGISTRY/unlisted/app:v1" | K apply -f - 2>&1); then
  die "the webhook admitted pod unlisted: $out"
fi
echo "$out" | grep -q 'admission webhook "workloads.pullgate.dev" denied the request' || die "unexpected refusal: $out"
echo "$out" | grep -q "$REGISTRY/unlisted/app:v1" || die "refusal does not name the image: $out"
log "webhook refused pod unlisted: $(echo "$out" | cut -c1-300)"
running allowed demo
log "pod allowed: Running"

# --- 3. webhook narrowed: the node refuses on its own
K patch validatingwebhookconfiguration pullgate --type=json -p \
  '[{"op":"replace","path":"/webhooks/0/namespaceSelector","value":{"matchLabels":{"example.com/none":"x"}}}]' >/dev/null
until_ok 30 "the narrowed webhook lets pod unlisted through" \
  eval "pod unlisted demo '$REGISTRY/unlisted/app:v1' | K apply --dry-run=server -f -"
pod unlisted demo "$REGISTRY/unlisted/app:v1" | K apply -f - >/dev/null
expect_event unlisted demo 'Error: SignatureValidationFailed' "pull refused by the node"
K -n demo describe pod unlisted | sed -n '/^Events:/,$p' | sed 's/^/    /' >&2

# --- 4. bypasses: the image is on the node (pulled through `dev`, not enforced)
K create namespace dev >/dev/null
until_ok 30 "default ServiceAccount in dev" K -n dev get serviceaccount default
pod puller dev "$REGISTRY/unlisted/app:v1" | K apply -f - >/dev/null
running puller dev
log "pod dev/puller: Running (dev is not enforced): unlisted/app:v1 is now on the node"
IMAGE_ID=$("$BIN/crictl" --config /dev/null -i "unix://$D/containerd.sock" -r "unix://$D/containerd.sock" \
  inspecti -o go-template --template '{{.status.id}}' "$REGISTRY/unlisted/app:v1" 2>/dev/null)
case $IMAGE_ID in sha256:*) ;; *) die "no image ID for unlisted/app:v1 (crictl said '$IMAGE_ID')";; esac
pod ifnotpresent demo "$REGISTRY/unlisted/app:v1" IfNotPresent | K apply -f - >/dev/null
pod never demo "$REGISTRY/unlisted/app:v1" Never | K apply -f - >/dev/null
pod imageid demo "$IMAGE_ID" IfNotPresent | K apply -f - >/dev/null
for p in ifnotpresent never imageid; do
  expect_event "$p" demo 'Error: SignatureValidationFailed' "container not created"
done

# --- 5. a key CIP with secretRef; unsigned refused, then signed with the real cosign
KEYS=$D/cosign; mkdir -p "$KEYS"
(cd "$KEYS" && COSIGN_PASSWORD= "$BIN/cosign" generate-key-pair >/dev/null 2>&1) || die "cosign generate-key-pair"
# Laid out as `cosign generate-key-pair k8s://` stores it: the private key and its password
# beside the public key. The node account cannot read it; the admission shim projects only
# cosign.pub into ConfigMap cosign-system/pullgate-public-keys.
printf 'not-a-real-password' > "$KEYS/cosign.password"
K -n cosign-system create secret generic demo-signing-key --from-file=cosign.pub="$KEYS/cosign.pub" \
  --from-file=cosign.key="$KEYS/cosign.key" --from-file=cosign.password="$KEYS/cosign.password" >/dev/null
K auth can-i get secret/demo-signing-key -n cosign-system \
  --as system:serviceaccount:pullgate-system:pullgate-node >/dev/null 2>&1 \
  && die "the node account can read the key Secret"
K auth can-i list secrets -n cosign-system \
  --as system:serviceaccount:pullgate-system:pullgate-node >/dev/null 2>&1 \
  && die "the node account can list Secrets"
K apply -f - >/dev/null <<YAML
apiVersion: policy.sigstore.dev/v1beta1
kind: ClusterImagePolicy
metadata: {name: signed-app}
spec:
  images: [{glob: "$REGISTRY/signed/**"}]
  # cosign v3 signs in the Sigstore bundle format (OCI referrers); policy-controller and pullgate
  # read bundles only when the authority says so.
  authorities: [{key: {secretRef: {name: demo-signing-key}}, signatureFormat: bundle}]
YAML
until_ok 30 "pullgate's snapshot has CIP signed-app and the key Secret" eval 'snapshot_has signed-app && snapshot_has demo-signing-key'
PROJECTION=$(K -n cosign-system get configmap pullgate-public-keys -o json)
echo "$PROJECTION" | grep -q 'BEGIN PUBLIC KEY' || die "no public key projected: $PROJECTION"
if echo "$PROJECTION" | grep -q 'PRIVATE KEY\|not-a-real-password'; then die "private material projected: $PROJECTION"; fi
if grep -q 'PRIVATE KEY\|not-a-real-password' "$D/snapshot.json"; then die "private material on the node's disk"; fi
grep -q 'SIGNING KEY EXPOSED' "$D/logs/admission.log" || die "no warning for the private key in demo-signing-key"
log "key Secret: only cosign.pub projected, the private key warned about; the node account cannot read Secrets"
pod unsigned demo "$REGISTRY/signed/app:v1" | K apply -f - >/dev/null
expect_event unsigned demo 'Error: SignatureValidationFailed' "unsigned image refused by the node"
DIGEST=$(curl -sfI -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
  "http://$REGISTRY/v2/signed/app/manifests/v1" | tr -d '\r' | awk -F': ' 'tolower($1)=="docker-content-digest"{print $2}')
[ -n "$DIGEST" ] || die "no digest for signed/app:v1"
COSIGN_PASSWORD= "$BIN/cosign" sign --key "$KEYS/cosign.key" --tlog-upload=false --use-signing-config=false \
  --allow-http-registry --allow-insecure-registry -y "$REGISTRY/signed/app@$DIGEST" >"$D/logs/cosign.log" 2>&1 \
  || { cat "$D/logs/cosign.log" >&2; die "cosign sign"; }
log "cosign sign --key: $REGISTRY/signed/app@$DIGEST"
pod signed demo "$REGISTRY/signed/app:v1" | K apply -f - >/dev/null
running signed demo
log "pod signed: Running"

# --- 6. audit: one JSON line per decision, from each front door
python3 - "$D/audit.log" "$D/audit-admission.log" <<'PY' || die "audit logs"
import json, sys, collections
lines = [json.loads(l) for f in sys.argv[1:] for l in open(f) if l.strip()]
need = {"time", "source", "node", "namespace", "pod", "image", "digest", "verdict", "policies", "reasons"}
for l in lines:
    missing = need - l.keys()
    assert not missing, f"audit line lacks {missing}: {l}"
by = collections.Counter((l["source"], l.get("pod"), l["verdict"]) for l in lines)
def has(source, pod, verdict):
    assert by[(source, pod, verdict)] >= 1, f"no {source} {verdict} line for pod {pod}: {sorted(by)}"
has("admission", "unlisted", "deny"); has("admission", "allowed", "allow")
has("cri-pull", "allowed", "allow"); has("cri-create", "allowed", "allow")
has("cri-pull", "unlisted", "deny")
for p in ("ifnotpresent", "never", "imageid"):
    has("cri-create", p, "deny")
    assert not any(l["source"] == "cri-pull" and l.get("pod") == p for l in lines), f"{p} pulled"
has("cri-pull", "unsigned", "deny"); has("cri-pull", "signed", "allow"); has("cri-create", "signed", "allow")
print(f"{len(lines)} audit lines: " + ", ".join(f"{s} {v} {n}" for (s, v), n in sorted(
    collections.Counter((l['source'], l['verdict']) for l in lines).items())))
PY
log "audit logs checked"
