#!/usr/bin/env bash
# Stops what tests/cluster/up.sh started in DIR (only those processes, by pid, plus the runc
# shims of DIR's containerd, found by DIR's socket path), unmounts what is left under DIR and
# removes it (KEEP=1 keeps the dir for its logs).
set -uo pipefail
D=${1:?usage: down.sh CLUSTER_DIR}
[ -f "$D/pids" ] || { echo "no $D/pids" >&2; exit 1; }
pid_of() { awk -v n="$1" '$1 == n {print $2}' "$D/pids"; }
stop() { # name: SIGTERM, 10 s, SIGKILL
  local pid; pid=$(pid_of "$1"); [ -n "$pid" ] || return 0
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.5; done
  kill -9 "$pid" 2>/dev/null || true
}
stop kubelet
# Pods the kubelet left: remove them through containerd itself while it still runs.
if [ -S "$D/containerd.sock" ] && [ -x "${PULLGATE_TESTBED_BIN:-/var/cache/pullgate-testbed/bin}/crictl" ]; then
  CRICTL="${PULLGATE_TESTBED_BIN:-/var/cache/pullgate-testbed/bin}/crictl -r unix://$D/containerd.sock -i unix://$D/containerd.sock -t 20s"
  $CRICTL rmp -fa >/dev/null 2>&1 || true
fi
stop pullgate
stop containerd
# Shims of this containerd (their command line names its socket); by pid only.
for pid in $(pgrep -f -- "-address $D/containerd.sock" || true); do kill -9 "$pid" 2>/dev/null || true; done
for n in admission kube-scheduler kube-controller-manager kube-apiserver etcd registry; do stop "$n"; done
# Anything still mounted under DIR (deepest first).
awk -v d="$D/" 'index($2, d) == 1 {print $2}' /proc/self/mounts | sort -r | while read -r m; do
  umount -l "$m" 2>/dev/null || true
done
# Pod cgroups the kubelet created under /kubepods (cgroup v1, cgroupfs driver).
for c in /sys/fs/cgroup/*/kubepods; do
  [ -d "$c" ] && find "$c" -depth -type d -exec rmdir {} \; 2>/dev/null
done
ip link del pgbr0 2>/dev/null || true
[ "${KEEP:-0}" = 1 ] || rm -rf "$D"
