#!/usr/bin/env bash
# Runs the node-side checks on a cluster started by tests/cluster/up.sh:
#  1. namespace `demo` labelled policy.sigstore.dev/include=true, an allow-list CIP for
#     REGISTRY/allowed/** (static pass);
#  2. a hostNetwork pod of REGISTRY/allowed/app:v1 reaches phase Running;
#  3. a hostNetwork pod of REGISTRY/unlisted/app:v1 is refused by the node: its events show
#     reason SignatureValidationFailed (kubelet's ErrImagePull from pullgate's PullImage deny).
# Exit 0 when all hold; prints what it saw otherwise.
set -euo pipefail
D=${1:?usage: prove.sh CLUSTER_DIR}
. "$D/env"
K() { "$KUBECTL" --kubeconfig "$D/admin.kubeconfig" "$@"; }
T0=$(date +%s.%N)
log() { printf '[%6.1fs] %s\n' "$(echo "$(date +%s.%N) - $T0" | bc)" "$*" >&2; }
pod() { # name image
  cat <<YAML
apiVersion: v1
kind: Pod
metadata: {name: $1, namespace: demo}
spec:
  hostNetwork: true
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: 1
  containers:
  - name: app
    image: $2
    imagePullPolicy: Always
    command: ["/bin/sleep", "3600"]
YAML
}
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
# pullgate's own watch must have seen the namespace label and the CIP before the pods come.
end=$(( $(date +%s) + 30 ))
until grep -q allow-listed "$D/snapshot.json" 2>/dev/null && grep -q '"demo"' "$D/snapshot.json"; do
  [ "$(date +%s)" -lt "$end" ] || { echo "pullgate never synced the CIP/namespace" >&2; exit 1; }
  sleep 0.5
done
log "namespace demo (include=true) and CIP allow-listed synced by pullgate"
# The default ServiceAccount must exist before a pod can be created (controller manager).
end=$(( $(date +%s) + 30 ))
until K -n demo get serviceaccount default >/dev/null 2>&1; do
  [ "$(date +%s)" -lt "$end" ] || { echo "no default ServiceAccount in demo" >&2; exit 1; }
  sleep 0.5
done
pod allowed "$REGISTRY/allowed/app:v1" | K apply -f - >/dev/null
pod unlisted "$REGISTRY/unlisted/app:v1" | K apply -f - >/dev/null
ok=1
if K -n demo wait --for=jsonpath='{.status.phase}'=Running --timeout=90s pod/allowed >/dev/null; then
  log "pod allowed: Running"
else
  ok=0; echo "pod allowed did not reach Running:" >&2; K -n demo describe pod allowed >&2
fi
# kubelet writes events with reason Failed and messages "Failed to pull image ...:
# SignatureValidationFailed: <pullgate's reason>" and "Error: SignatureValidationFailed"; the
# container's waiting reason alternates between SignatureValidationFailed and ImagePullBackOff.
end=$(( $(date +%s) + 60 ))
until K -n demo get events --field-selector involvedObject.name=unlisted \
    -o jsonpath='{range .items[*]}{.reason}{"\t"}{.message}{"\n"}{end}' | grep -q 'Error: SignatureValidationFailed'; do
  if [ "$(date +%s)" -ge "$end" ]; then ok=0; echo "pod unlisted: no SignatureValidationFailed event" >&2; break; fi
  sleep 0.5
done
K -n demo describe pod unlisted | sed -n '/^Events:/,$p' > "$D/unlisted.events"
if grep -q 'SignatureValidationFailed' "$D/unlisted.events"; then
  log "pod unlisted: refused by the node (kubectl describe pod shows SignatureValidationFailed)"
  sed 's/^/    /' "$D/unlisted.events" >&2
  phase=$(K -n demo get pod unlisted -o jsonpath='{.status.phase}')
  [ "$phase" = Pending ] || { ok=0; echo "pod unlisted is $phase, want Pending" >&2; }
else
  ok=0; cat "$D/unlisted.events" >&2
fi
log "audit lines: $(wc -l < "$D/audit.log")"
grep -h '"demo"' "$D/audit.log" | head -4 | cut -c1-400 >&2 || true
[ $ok = 1 ]
