#!/usr/bin/env bash
# up.sh, prove.sh, then down.sh (always, by trap). Exit status: prove.sh's (or up.sh's).
# KEEP=1 keeps the cluster dir (logs) after stopping everything.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
D=$(mktemp -d /tmp/pgk-XXXXXX)
trap '"$HERE/down.sh" "$D"' EXIT
export PULLGATE_CLUSTER_DIR=$D
"$HERE/up.sh" >/dev/null || { echo "up.sh failed; logs in $D/logs (KEEP=1 keeps them)" >&2; tail -20 "$D"/logs/*.log >&2; exit 1; }
"$HERE/prove.sh" "$D" || { echo "prove.sh failed" >&2; tail -30 "$D/logs/kubelet.log" "$D/logs/pullgate.log" >&2; exit 1; }
