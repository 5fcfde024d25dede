#!/bin/sh
# Installs pullgate on this node as a host service, then keeps its API credentials fresh.
# Runs in the pullgate-node DaemonSet pod: privileged, hostPID, the host's / at /host.
# The INSTALL_* and *_SECONDS variables exist so tests/deploy_manifests.rs can run this script
# against a scratch directory; the DaemonSet leaves them unset.
set -eu
HOST=${INSTALL_HOST_ROOT:-/host}
FILES=${INSTALL_FILES:-/files}
SA=${INSTALL_SA_DIR:-/var/run/secrets/kubernetes.io/serviceaccount}
BINARY=${INSTALL_BINARY:-/usr/local/bin/pullgate}
TOKEN_SYNC_SECONDS=${TOKEN_SYNC_SECONDS:-60}
START_TIMEOUT_SECONDS=${START_TIMEOUT_SECONDS:-20}
: "${KUBERNETES_SERVICE_HOST:?is not set: run this script in a pod}"
: "${KUBERNETES_SERVICE_PORT:?is not set: run this script in a pod}"
: "${NODE_NAME:?is not set: the DaemonSet passes spec.nodeName}"

log() { echo "pullgate-installer: $*"; }
host() { nsenter -t 1 -m -u -i -n -p -- "$@"; }

# put SRC DEST MODE: replaces DEST atomically when its content differs from SRC (a running
# pullgate keeps the old binary's inode until it restarts) and notes that pullgate must restart.
CHANGED=false
put() {
  if ! cmp -s "$1" "$2"; then
    install -D -m "$3" "$1" "$2.new"
    mv -f "$2.new" "$2"
    CHANGED=true
  fi
}

# 1. The binary, the unit and the kubelet drop-in (the same files as systemd/ in the repository).
put "$BINARY" "$HOST/usr/local/bin/pullgate" 0755
put "$FILES/pullgate.service" "$HOST/etc/systemd/system/pullgate.service" 0644
put "$FILES/10-pullgate.conf" "$HOST/etc/systemd/system/kubelet.service.d/10-pullgate.conf" 0644

# 2. Cluster mode: a kubeconfig for this pod's service account. The host cannot resolve
#    kubernetes.default.svc, so the Service's address from the environment is used; the token
#    file is rewritten below as the kubelet rotates the projected token, and pullgate's client
#    re-reads it, so only a changed server or CA needs a restart.
install -d -m 0700 "$HOST/etc/pullgate" "$HOST/var/lib/pullgate"
put "$SA/ca.crt" "$HOST/etc/pullgate/ca.crt" 0644
install -m 0600 "$SA/token" "$HOST/var/lib/pullgate/token.new"
mv -f "$HOST/var/lib/pullgate/token.new" "$HOST/var/lib/pullgate/token"
case "$KUBERNETES_SERVICE_HOST" in
  *:*) SERVER="https://[$KUBERNETES_SERVICE_HOST]:$KUBERNETES_SERVICE_PORT" ;;
  *) SERVER="https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT" ;;
esac
scratch=$(mktemp -d)
cat > "$scratch/kubeconfig" <<KUBECONFIG
apiVersion: v1
kind: Config
clusters:
- name: cluster
  cluster:
    server: $SERVER
    certificate-authority: /etc/pullgate/ca.crt
users:
- name: pullgate-node
  user:
    tokenFile: /var/lib/pullgate/token
contexts:
- name: pullgate
  context: {cluster: cluster, user: pullgate-node}
current-context: pullgate
KUBECONFIG
put "$scratch/kubeconfig" "$HOST/etc/pullgate/kubeconfig" 0600
# Read by the unit's EnvironmentFile=: cluster mode without editing ExecStart.
printf 'PULLGATE_KUBECONFIG=/etc/pullgate/kubeconfig\nNODE_NAME=%s\n' "$NODE_NAME" > "$scratch/env"
put "$scratch/env" "$HOST/etc/pullgate/pullgate.env" 0644
rm -rf "$scratch"

# 3. Start it, restarting only when something above changed: re-running the installer (a pod
#    restart, a DaemonSet change that keeps the release) must not interrupt the node's pulls.
host systemctl daemon-reload
host systemctl enable pullgate.service
if [ "$CHANGED" = true ]; then
  host systemctl restart pullgate.service
else
  host systemctl start pullgate.service
fi
i=0
until [ -S "$HOST/run/pullgate/pullgate.sock" ]; do
  i=$((i + 1))
  if [ "$i" -gt $((START_TIMEOUT_SECONDS * 5)) ]; then
    log "pullgate did not come up within ${START_TIMEOUT_SECONDS}s; kubelet is left unchanged"
    host systemctl status --no-pager pullgate.service || true
    exit 1
  fi
  sleep 0.2
done
log "pullgate is serving on /run/pullgate/pullgate.sock"

# 4. Optional: point kubelet at pullgate. Off by default: a kubelet restart is the cluster
#    operator's call (kind-config/ and kubeadm set imageServiceEndpoint at node creation).
if [ "${CONFIGURE_KUBELET:-false}" = "true" ]; then
  CONFIG="$HOST/var/lib/kubelet/config.yaml"
  if [ ! -f "$CONFIG" ]; then
    log "CONFIGURE_KUBELET=true, but /var/lib/kubelet/config.yaml does not exist on this node:"
    log "set imageServiceEndpoint: unix:///run/pullgate/pullgate.sock in its kubelet configuration"
    exit 1
  elif grep -q '^imageServiceEndpoint:' "$CONFIG"; then
    log "kubelet already has $(grep '^imageServiceEndpoint:' "$CONFIG"); left as it is"
  else
    # Without a final newline the appended line would be glued to the file's last line.
    if [ -n "$(tail -c 1 "$CONFIG")" ]; then echo >> "$CONFIG"; fi
    echo 'imageServiceEndpoint: unix:///run/pullgate/pullgate.sock' >> "$CONFIG"
    host systemctl restart kubelet.service
    log "kubelet now pulls through pullgate"
  fi
fi

# 5. Keep the token fresh (kubelet rotates the projected token; pullgate re-reads tokenFile).
while true; do
  sleep "$TOKEN_SYNC_SECONDS"
  if ! cmp -s "$SA/token" "$HOST/var/lib/pullgate/token"; then
    install -m 0600 "$SA/token" "$HOST/var/lib/pullgate/token.new"
    mv -f "$HOST/var/lib/pullgate/token.new" "$HOST/var/lib/pullgate/token"
  fi
done
