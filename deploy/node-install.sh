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
KUBELET_TIMEOUT_SECONDS=${KUBELET_TIMEOUT_SECONDS:-120}
PROC=${INSTALL_PROC:-/proc}
# Drop-ins are read in file-name order, as kubelet does (C collation).
export LC_ALL=C
: "${KUBERNETES_SERVICE_HOST:?is not set: run this script in a pod}"
: "${KUBERNETES_SERVICE_PORT:?is not set: run this script in a pod}"
: "${NODE_NAME:?is not set: the DaemonSet passes spec.nodeName}"

log() { echo "pullgate-installer: $*"; }
host() { nsenter -t 1 -m -u -i -n -p -- "$@"; }

# --- kubelet's endpoints -------------------------------------------------------------------
# Both kubelet endpoints go to pullgate: CRI RuntimeService (containerRuntimeEndpoint) and
# ImageService (imageServiceEndpoint). Where the setting lives, so that `kubeadm upgrade` keeps it:
#  - a KubeletConfiguration drop-in, $KUBELET_DROPIN in kubelet's --config-dir (beta and on by
#    default since Kubernetes 1.30). kubeadm rewrites /var/lib/kubelet/config.yaml on every
#    upgrade (from the kubelet-config ConfigMap) but never writes or removes files in that
#    directory, and a drop-in overrides config.yaml field by field;
#  - when kubelet runs without --config-dir, a systemd drop-in for kubelet.service
#    ($UNIT_DROPIN) adds it to KUBELET_CONFIG_ARGS, the variable kubeadm's own kubelet drop-in
#    puts on kubelet's command line;
#  - kubelet flags beat every config file, and kubeadm up to at least 1.31 writes
#    --container-runtime-endpoint into /var/lib/kubelet/kubeadm-flags.env (written by
#    init/join, not by `kubeadm upgrade node`). When the running kubelet got an endpoint flag
#    from that file, its value there is switched to pullgate's socket (the original is kept in
#    /var/lib/pullgate/kubeadm-flags.orig for the rollback); a flag from anywhere else is
#    reported and left alone.
# Whatever wrote it, readiness reads what the *running* kubelet uses (below) and fails when
# either endpoint is not pullgate's socket, so an upgrade that undoes it is never silent.
SOCKET=/run/pullgate/pullgate.sock
ENDPOINT=unix://$SOCKET
CONTAINERD_ENDPOINT=unix:///run/containerd/containerd.sock
DEFAULT_CONFIG_DIR=/etc/kubernetes/kubelet.conf.d
KUBELET_DROPIN=90-pullgate.conf
UNIT_DROPIN=/etc/systemd/system/kubelet.service.d/20-pullgate-config-dir.conf
FLAGS_ENV=/var/lib/kubelet/kubeadm-flags.env
FLAGS_ORIG=/var/lib/pullgate/kubeadm-flags.orig
LEGACY_LINE="imageServiceEndpoint: $ENDPOINT"

# pullgate_answers: one CRI RuntimeService/Version call over pullgate's socket (gRPC over
# HTTP/2), true when it ends with grpc-status 0. pullgate forwards it to containerd, so this
# also proves the path kubelet will take.
pullgate_answers() {
  headers=$(printf '\000\000\000\000\000' | curl -sS --max-time 2 --http2-prior-knowledge \
    --unix-socket "$HOST$SOCKET" -H 'content-type: application/grpc' -H 'te: trailers' \
    --data-binary @- -o /dev/null -D - http://localhost/runtime.v1.RuntimeService/Version \
    2>/dev/null) || return 1
  printf '%s\n' "$headers" | tr -d '\r' | grep -qi '^grpc-status: *0$'
}

# flag NAME: the value of kubelet's last --NAME=V or --NAME V on stdin (one argument a line).
flag() {
  awk -v f="--$1" 'next_is_value { v = $0; next_is_value = 0; next }
    $0 == f { next_is_value = 1; next }
    index($0, f "=") == 1 { v = substr($0, length(f) + 2) }
    END { print v }'
}

# field NAME FILE: a top-level scalar of a KubeletConfiguration (YAML) file, unquoted.
field() {
  [ -f "$2" ] || return 0
  sed -n "s/^$1:[[:space:]]*//p" "$2" | sed "s/[[:space:]]*#.*//; s/^[\"']//; s/[\"']\$//" |
    tail -n 1
}

# norm ENDPOINT: the socket path (unix:// and /var/run -> /run, as kubelet resolves them).
norm() {
  v=${1#unix://}
  case "$v" in /var/run/*) v=/run/${v#/var/run/} ;; esac
  echo "$v"
}

# started_at PID: when the process started, in seconds since the epoch.
started_at() {
  btime=$(awk '$1 == "btime" { print $2 }' "$PROC/stat")
  ticks=$(sed 's/.*) //' "$PROC/$1/stat" | awk '{ print $20 }')
  echo $((btime + ticks / $(getconf CLK_TCK)))
}

# inspect_kubelet: the running kubelet (hostPID: the host's /proc) as it was started. Sets PID,
# ARGS (its arguments, one a line), CONFIG, CONFIG_DIR, RUNTIME and IMAGE (its effective
# endpoints: flags over config-dir drop-ins over --config, the image endpoint defaulting to the
# runtime one), and STALE (a config file changed after kubelet started; empty if none).
inspect_kubelet() {
  PID=
  ARGS=
  CONFIG=
  CONFIG_DIR=
  for d in "$PROC"/[0-9]*; do
    if [ "$(cat "$d/comm" 2>/dev/null)" = kubelet ]; then PID=${d##*/}; break; fi
  done
  [ -n "$PID" ] || return 1
  ARGS=$(tr '\0' '\n' < "$PROC/$PID/cmdline")
  CONFIG=$(printf '%s\n' "$ARGS" | flag config)
  CONFIG_DIR=$(printf '%s\n' "$ARGS" | flag config-dir)
  RUNTIME=
  IMAGE=
  STALE=
  start=$(started_at "$PID")
  set --
  if [ -n "$CONFIG" ]; then set -- "$HOST$CONFIG"; fi
  if [ -n "$CONFIG_DIR" ] && [ -d "$HOST$CONFIG_DIR" ]; then
    # A removed drop-in changes the directory's mtime.
    if [ "$(stat -c %Y "$HOST$CONFIG_DIR")" -gt "$start" ]; then STALE=$CONFIG_DIR; fi
    for f in "$HOST$CONFIG_DIR"/*.conf; do
      if [ -f "$f" ]; then set -- "$@" "$f"; fi
    done
  fi
  for f in "$@"; do
    [ -f "$f" ] || continue
    if [ "$(stat -c %Y "$f")" -gt "$start" ]; then STALE=${f#"$HOST"}; fi
    v=$(field containerRuntimeEndpoint "$f")
    if [ -n "$v" ]; then RUNTIME=$v; fi
    v=$(field imageServiceEndpoint "$f")
    if [ -n "$v" ]; then IMAGE=$v; fi
  done
  v=$(printf '%s\n' "$ARGS" | flag container-runtime-endpoint)
  if [ -n "$v" ]; then RUNTIME=$v; fi
  v=$(printf '%s\n' "$ARGS" | flag image-service-endpoint)
  if [ -n "$v" ]; then IMAGE=$v; fi
  # kubelet's defaults (1.27+).
  if [ -z "$RUNTIME" ]; then RUNTIME=$CONTAINERD_ENDPOINT; fi
  if [ -z "$IMAGE" ]; then IMAGE=$RUNTIME; fi
}

# kubelet_wired: true when the running kubelet sends runtime and image calls to pullgate;
# otherwise WHY says what it does instead.
kubelet_wired() {
  WHY=
  if ! inspect_kubelet; then
    WHY="no kubelet process runs on this node"
    return 1
  fi
  if [ -n "$STALE" ]; then
    WHY="kubelet (pid $PID) started before $STALE changed: its endpoints are unknown until it restarts"
    return 1
  fi
  if [ "$(norm "$RUNTIME")" != "$SOCKET" ]; then
    WHY="containerRuntimeEndpoint is $RUNTIME"
  fi
  if [ "$(norm "$IMAGE")" != "$SOCKET" ]; then
    WHY="${WHY:+$WHY, }imageServiceEndpoint is $IMAGE"
  fi
  if [ -n "$WHY" ]; then
    WHY="kubelet (pid $PID) bypasses pullgate: $WHY (want $ENDPOINT for both)"
    return 1
  fi
}

FAILED=$HOST/var/lib/pullgate/pullgate.failed-sha256
sha256() { sha256sum "$1" | cut -d' ' -f1; }
# release_failed: true when the release in this image is one that did not answer on this node.
release_failed() {
  [ -f "$FAILED" ] && [ "$(cat "$FAILED")" = "$(sha256 "$BINARY")" ]
}

# Readiness probe (node.yaml): `install.sh check`.
if [ "${1:-}" = check ]; then
  if release_failed; then
    echo "this release (sha256 $(cat "$FAILED")) did not answer CRI calls on this node; the previous release serves"
    exit 1
  fi
  if ! pullgate_answers; then
    echo "pullgate does not answer CRI calls on $SOCKET"
    exit 1
  fi
  if ! kubelet_wired; then
    echo "$WHY"
    exit 1
  fi
  echo "kubelet sends runtime and image calls to pullgate"
  exit 0
fi

# replace SRC DEST: like put, for kubelet's files (sets KUBELET_CHANGED, not CHANGED).
replace() {
  if ! cmp -s "$1" "$2"; then
    install -D -m 0644 "$1" "$2.new"
    mv -f "$2.new" "$2"
    KUBELET_CHANGED=true
  fi
}

# wire_kubelet: points the running kubelet's two endpoints at pullgate and restarts it when
# needed; true once the restarted kubelet uses them.
wire_kubelet() {
  if ! inspect_kubelet; then
    log "CONFIGURE_KUBELET=true, but no kubelet process runs on this node: set"
    log "containerRuntimeEndpoint and imageServiceEndpoint to $ENDPOINT in its configuration"
    return 1
  fi
  KUBELET_CHANGED=false
  tmp=$(mktemp -d)
  cat > "$tmp/dropin" <<DROPIN
# Written by pullgate's installer (deploy/node-install.sh): kubelet's runtime and image calls
# go through pullgate. Removing this file (and restarting kubelet) sends them to containerd.
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
containerRuntimeEndpoint: $ENDPOINT
imageServiceEndpoint: $ENDPOINT
DROPIN
  replace "$tmp/dropin" "$HOST${CONFIG_DIR:-$DEFAULT_CONFIG_DIR}/$KUBELET_DROPIN"
  if [ -z "$CONFIG_DIR" ] || [ -f "$HOST$UNIT_DROPIN" ]; then
    cat > "$tmp/unit" <<UNIT
# Written by pullgate's installer: kubelet reads KubeletConfiguration drop-ins from
# $DEFAULT_CONFIG_DIR (pullgate's sets both CRI endpoints). KUBELET_CONFIG_ARGS is the
# variable kubeadm's kubelet drop-in passes to kubelet; this file sorts after it.
[Service]
Environment="KUBELET_CONFIG_ARGS=${CONFIG:+--config=$CONFIG }--config-dir=$DEFAULT_CONFIG_DIR"
# Kubernetes 1.28 and 1.29 accept --config-dir only with this set (ignored since 1.30).
Environment=KUBELET_CONFIG_DROPIN_DIR_ALPHA=on
UNIT
    replace "$tmp/unit" "$HOST$UNIT_DROPIN"
  fi
  # Earlier releases appended the image endpoint to config.yaml, which kubeadm rewrites.
  if [ -n "$CONFIG" ] && grep -qx "$LEGACY_LINE" "$HOST$CONFIG"; then
    grep -vx "$LEGACY_LINE" "$HOST$CONFIG" > "$tmp/config" || true
    cat "$tmp/config" > "$HOST$CONFIG"
    KUBELET_CHANGED=true
  fi
  for name in container-runtime-endpoint image-service-endpoint; do
    v=$(printf '%s\n' "$ARGS" | flag "$name")
    if [ -z "$v" ] || [ "$(norm "$v")" = "$SOCKET" ]; then continue; fi
    if [ -f "$HOST$FLAGS_ENV" ] && grep -qF -- "--$name=$v" "$HOST$FLAGS_ENV"; then
      echo "$name $v" >> "$HOST$FLAGS_ORIG"
      sed "s#--$name=$v#--$name=$ENDPOINT#g" "$HOST$FLAGS_ENV" > "$tmp/flags"
      cat "$tmp/flags" > "$HOST$FLAGS_ENV"
      KUBELET_CHANGED=true
    else
      log "kubelet runs with --$name=$v, which beats every config file, and it is not from"
      log "$FLAGS_ENV: remove that flag from kubelet's command line"
      rm -rf "$tmp"
      return 1
    fi
  done
  rm -rf "$tmp"
  if [ "$KUBELET_CHANGED" = false ] && [ -z "$STALE" ] && kubelet_wired; then
    log "kubelet already sends runtime and image calls to pullgate; left as it is"
    return 0
  fi
  restart_kubelet
}

# restart_kubelet: restarts kubelet and waits for a new kubelet process; true when it uses
# pullgate for both endpoints.
restart_kubelet() {
  old=$PID
  host systemctl daemon-reload
  host systemctl restart kubelet.service
  deadline=$(($(date +%s) + KUBELET_TIMEOUT_SECONDS))
  while :; do
    if inspect_kubelet && [ "$PID" != "$old" ]; then
      if kubelet_wired; then
        log "kubelet now sends runtime and image calls to pullgate"
        return 0
      elif [ -z "$STALE" ]; then
        log "kubelet restarted, but $WHY"
        return 1
      fi
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
      log "no new kubelet process within ${KUBELET_TIMEOUT_SECONDS}s"
      return 1
    fi
    sleep 0.2
  done
}

# unwire_kubelet: undoes what wire_kubelet wrote and restarts kubelet; false when there was
# nothing of the installer's to undo.
unwire_kubelet() {
  found=false
  dirs=$DEFAULT_CONFIG_DIR
  if inspect_kubelet && [ -n "$CONFIG_DIR" ]; then dirs="$dirs $CONFIG_DIR"; fi
  for d in $dirs; do
    if [ -f "$HOST$d/$KUBELET_DROPIN" ]; then
      rm -f "$HOST$d/$KUBELET_DROPIN"
      found=true
    fi
  done
  if [ -f "$HOST$UNIT_DROPIN" ]; then
    rm -f "$HOST$UNIT_DROPIN"
    found=true
  fi
  if [ -f "$HOST$FLAGS_ORIG" ]; then
    while read -r name v; do
      sed "s#--$name=$ENDPOINT#--$name=$v#g" "$HOST$FLAGS_ENV" > "$HOST$FLAGS_ENV.new"
      mv -f "$HOST$FLAGS_ENV.new" "$HOST$FLAGS_ENV"
    done < "$HOST$FLAGS_ORIG"
    rm -f "$HOST$FLAGS_ORIG"
    found=true
  fi
  if [ -n "$CONFIG" ] && [ -f "$HOST$CONFIG" ] && grep -qx "$LEGACY_LINE" "$HOST$CONFIG"; then
    grep -vx "$LEGACY_LINE" "$HOST$CONFIG" > "$HOST$CONFIG.new" || true
    cat "$HOST$CONFIG.new" > "$HOST$CONFIG"
    rm -f "$HOST$CONFIG.new"
    found=true
  fi
  [ "$found" = true ] || return 1
  host systemctl daemon-reload
  host systemctl restart kubelet.service
}

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
#    The binary it replaces is kept in $PREVIOUS: a release that does not answer within the
#    start timeout is replaced by it again (step 3), its digest is written to $FAILED, and later
#    runs of this installer (a pod restart) leave the previous release in place while that
#    release is the one on offer. The readiness probe fails meanwhile, so a rolling update of
#    the DaemonSet stops at the first node instead of spreading a broken release.
PREVIOUS=$HOST/var/lib/pullgate/pullgate.previous
install -d -m 0700 "$HOST/var/lib/pullgate"
ROLLBACK=false
if release_failed; then
  log "INSTALL FAILED: this release (sha256 $(sha256 "$BINARY")) did not answer CRI calls when it"
  log "was installed on this node; the previous release stays. Roll the DaemonSet back, or delete"
  log "${FAILED#"$HOST"} on the node to try this release again"
else
  if [ -f "$HOST/usr/local/bin/pullgate" ] && ! cmp -s "$BINARY" "$HOST/usr/local/bin/pullgate"; then
    install -m 0755 "$HOST/usr/local/bin/pullgate" "$PREVIOUS.new"
    mv -f "$PREVIOUS.new" "$PREVIOUS"
    ROLLBACK=true
  fi
  put "$BINARY" "$HOST/usr/local/bin/pullgate" 0755
fi
put "$FILES/pullgate.service" "$HOST/etc/systemd/system/pullgate.service" 0644
put "$FILES/10-pullgate.conf" "$HOST/etc/systemd/system/kubelet.service.d/10-pullgate.conf" 0644

# 2. Cluster mode: a kubeconfig for this pod's service account. The host cannot resolve
#    kubernetes.default.svc, so the Service's address from the environment is used; the token
#    file is rewritten below as the kubelet rotates the projected token, and pullgate's client
#    re-reads it, so only a changed server or CA needs a restart.
install -d -m 0700 "$HOST/etc/pullgate"
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
# Answering, not just a socket file: a CRI Version call through pullgate (which forwards it to
# containerd) must succeed before kubelet is pointed at it.
# answers_within: true when pullgate answers within START_TIMEOUT_SECONDS.
answers_within() {
  deadline=$(($(date +%s) + START_TIMEOUT_SECONDS))
  until pullgate_answers; do
    if [ "$(date +%s)" -ge "$deadline" ]; then return 1; fi
    sleep 0.2
  done
}
if ! answers_within; then
  log "pullgate does not answer CRI calls on $SOCKET within ${START_TIMEOUT_SECONDS}s"
  host systemctl status --no-pager pullgate.service || true
  if [ "$ROLLBACK" = true ]; then
    log "rolling back to the previous release"
    install -m 0755 "$PREVIOUS" "$HOST/usr/local/bin/pullgate.new"
    mv -f "$HOST/usr/local/bin/pullgate.new" "$HOST/usr/local/bin/pullgate"
    host systemctl restart pullgate.service
    if answers_within; then
      # Only now is the new release to blame (not containerd, not the node).
      sha256 "$BINARY" > "$FAILED"
      log "INSTALL FAILED: the previous release serves again; the new one (sha256 $(cat "$FAILED"))"
      log "is not installed, and this pod stays unready"
      ROLLBACK=done
    else
      log "the previous release does not answer either"
    fi
  fi
  if [ "$ROLLBACK" != done ]; then
    # kubelet needs pullgate for every container operation: never leave it on a dead socket.
    if unwire_kubelet; then
      log "rolled kubelet back to containerd ($CONTAINERD_ENDPOINT); this node is not enforced"
    else
      log "kubelet is left unchanged"
    fi
    exit 1
  fi
fi
if [ "$ROLLBACK" != done ] && ! release_failed; then
  rm -f "$FAILED"
  log "pullgate is serving on $SOCKET"
fi

# 4. Optional: point kubelet at pullgate. Off by default: a kubelet restart is the cluster
#    operator's call (kind-config/ sets both endpoints at node creation).
if [ "${CONFIGURE_KUBELET:-false}" = "true" ]; then
  if ! wire_kubelet; then
    if unwire_kubelet; then
      log "rolled kubelet back to containerd ($CONTAINERD_ENDPOINT); this node is not enforced"
    fi
    exit 1
  fi
fi
if kubelet_wired; then
  log "kubelet sends runtime and image calls to pullgate"
else
  log "not ready: $WHY"
fi

# 5. Keep the token fresh (kubelet rotates the projected token; pullgate re-reads tokenFile).
while true; do
  sleep "$TOKEN_SYNC_SECONDS"
  if ! cmp -s "$SA/token" "$HOST/var/lib/pullgate/token"; then
    install -m 0600 "$SA/token" "$HOST/var/lib/pullgate/token.new"
    mv -f "$HOST/var/lib/pullgate/token.new" "$HOST/var/lib/pullgate/token"
  fi
done
