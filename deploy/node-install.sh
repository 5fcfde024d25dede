#!/bin/sh
# Installs pullgate on this node as a host service, then keeps its API credentials fresh.
# Runs in the pullgate-node DaemonSet pod: privileged, hostPID, the host's / at /host.
set -eu
HOST=/host
FILES=/files

log() { echo "pullgate-installer: $*"; }
host() { nsenter -t 1 -m -u -i -n -p -- "$@"; }

# 1. The binary, replaced atomically (a running pullgate keeps its old inode until restarted).
install -D -m 0755 /usr/local/bin/pullgate "$HOST/usr/local/bin/pullgate.new"
mv -f "$HOST/usr/local/bin/pullgate.new" "$HOST/usr/local/bin/pullgate"

# 2. The unit and the kubelet drop-in, the same files as systemd/ in the repository.
install -D -m 0644 "$FILES/pullgate.service" "$HOST/etc/systemd/system/pullgate.service"
install -D -m 0644 "$FILES/10-pullgate.conf" "$HOST/etc/systemd/system/kubelet.service.d/10-pullgate.conf"

# 3. Cluster mode: a kubeconfig for this pod's service account. The host cannot resolve
#    kubernetes.default.svc, so the Service's address from the environment is used; the token
#    file is rewritten below as the kubelet rotates the projected token.
install -d -m 0700 "$HOST/etc/pullgate" "$HOST/var/lib/pullgate"
SA=/var/run/secrets/kubernetes.io/serviceaccount
install -m 0644 "$SA/ca.crt" "$HOST/etc/pullgate/ca.crt"
install -m 0600 "$SA/token" "$HOST/var/lib/pullgate/token"
case "$KUBERNETES_SERVICE_HOST" in
  *:*) SERVER="https://[$KUBERNETES_SERVICE_HOST]:$KUBERNETES_SERVICE_PORT" ;;
  *) SERVER="https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT" ;;
esac
cat > "$HOST/etc/pullgate/kubeconfig.new" <<KUBECONFIG
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
chmod 0600 "$HOST/etc/pullgate/kubeconfig.new"
mv -f "$HOST/etc/pullgate/kubeconfig.new" "$HOST/etc/pullgate/kubeconfig"
printf 'PULLGATE_KUBECONFIG=/etc/pullgate/kubeconfig\nNODE_NAME=%s\n' "$NODE_NAME" \
  > "$HOST/etc/pullgate/pullgate.env"

# 4. Start (or restart onto the new binary) before kubelet is pointed at it.
host systemctl daemon-reload
host systemctl enable pullgate.service
host systemctl restart pullgate.service
i=0
until [ -S "$HOST/run/pullgate/pullgate.sock" ]; do
  i=$((i + 1))
  if [ "$i" -gt 100 ]; then
    log "pullgate did not come up; kubelet is left unchanged"
    host systemctl status --no-pager pullgate.service || true
    exit 1
  fi
  sleep 0.2
done
log "pullgate is serving on /run/pullgate/pullgate.sock"

# 5. Optional: point kubelet at pullgate. Off by default: a kubelet restart is the cluster
#    operator's call (kind-config/ and kubeadm set imageServiceEndpoint at node creation).
if [ "${CONFIGURE_KUBELET:-false}" = "true" ]; then
  CONFIG="$HOST/var/lib/kubelet/config.yaml"
  if grep -q '^imageServiceEndpoint:' "$CONFIG"; then
    log "kubelet already has an imageServiceEndpoint; left as it is"
  else
    echo 'imageServiceEndpoint: unix:///run/pullgate/pullgate.sock' >> "$CONFIG"
    host systemctl restart kubelet.service
    log "kubelet now pulls through pullgate"
  fi
fi

# 6. Keep the token fresh (kubelet rotates the projected token; pullgate re-reads tokenFile).
while true; do
  sleep 60
  if ! cmp -s "$SA/token" "$HOST/var/lib/pullgate/token"; then
    install -m 0600 "$SA/token" "$HOST/var/lib/pullgate/token.new"
    mv -f "$HOST/var/lib/pullgate/token.new" "$HOST/var/lib/pullgate/token"
  fi
done
