#!/usr/bin/env bash
# Builds the test bed's real peers (cosign, crictl, containerd 2.x, policy-controller's tester,
# Kubernetes node/control-plane binaries, etcd) from their published Go modules, at the versions
# pinned in tests/testbed/versions.env, into a cache keyed by peer and version:
#
#   $PULLGATE_TESTBED_CACHE (default /var/cache/pullgate-testbed)
#     <peer>-<version>/bin/…     the built binaries (+ .built stamp, build.log)
#     bin/                       stable symlinks to every built binary: what tests use
#     status                     one line per peer: name, version, built|cached|failed, seconds, reason
#     go/mod, go/build           GOMODCACHE and GOCACHE (so warm rebuilds are cheap)
#
# Idempotent: a peer whose stamp matches its pin (and, for go.mod recipes, the recipe's go.sum)
# is skipped. Exits non-zero only when an essential peer (cosign, crictl) cannot be built; other
# failures are recorded in `status` (and reported) so tests can skip or fail with the reason.
# A failed non-essential build is remembered too (not retried on every run) unless the error looks
# like a network error; PULLGATE_TESTBED_RETRY=1 retries everything that failed.
# PULLGATE_TESTBED_ONLY="cosign crictl" limits the run to those peers; PULLGATE_TESTBED_PRUNE=1
# removes the Go caches afterwards (see the end).
#
# Needs: Go (>= 1.26) on PATH and the Go module proxy. Runs Go builds under `nice`.
set -uo pipefail

# Everything runs inside main, so bash has parsed the whole file before building anything (a
# checkout that changes this file during a long build cannot derail a running install).
main() {
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
. "$here/versions.env"

CACHE=${PULLGATE_TESTBED_CACHE:-/var/cache/pullgate-testbed}
BIN=$CACHE/bin
NICE=${PULLGATE_TESTBED_NICE:-15}
ONLY=${PULLGATE_TESTBED_ONLY:-}

if ! command -v go >/dev/null; then
  echo "testbed: go is not on PATH (Go >= 1.26 is expected on these machines)" >&2
  exit 1
fi
mkdir -p "$CACHE" "$BIN" "$CACHE/go/mod" "$CACHE/go/build"
exec 9>"$CACHE/.lock"
flock 9 # one install at a time per machine

export GOMODCACHE=$CACHE/go/mod GOCACHE=$CACHE/go/build
export GOTOOLCHAIN=local # never download another Go toolchain: a pin that needs one is refused
export CGO_ENABLED=0
export GOFLAGS="-trimpath -buildvcs=false"
unset GOBIN
goversion=$(go env GOVERSION)
echo "testbed: $goversion, cache $CACHE"

status_new=$CACHE/status.new
: >"$status_new"
essential_failed=()
total_start=$(date +%s)

# record NAME VERSION STATE SECONDS REASON
record() {
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >>"$status_new"
  if [ -n "$5" ]; then
    printf 'testbed: %-18s %-9s %-7s %4ss  %s\n' "$1" "$2" "$3" "$4" "$5"
  else
    printf 'testbed: %-18s %-9s %-7s %4ss\n' "$1" "$2" "$3" "$4"
  fi
}

# The most telling lines of a failed build log (the go command's own `go: …` error and the
# module proxy's `server response`, else compiler errors, else the last lines), on one line.
failure_reason() {
  local log=$1 line
  line=$(grep -E '^go: |server response|requires go|error|refus|cannot|must not|invalid|no matching|denied|timeout|forbidden|not available' "$log" |
    grep -vE '^#|^missing binary|^go: downloading' | head -n 4)
  [ -n "$line" ] || line=$(grep -v '^missing binary' "$log" | tail -n 3)
  [ -n "$line" ] || line=$(tail -n 3 "$log")
  printf '%s' "$line" | tr '\t\n' '  ' | tr -s ' ' | cut -c1-700
}

# link NAME DIR BINS...: point $BIN/<bin> at DIR/bin/<bin>.
link() {
  local dir=$2 b
  shift 2
  for b in "$@"; do ln -sfn "$dir/bin/$b" "$BIN/$b"; done
}
unlink_bins() {
  local b
  for b in "$@"; do rm -f "$BIN/$b"; done
}

# peer NAME VERSION ESSENTIAL(yes|no) KEY "BINS" BUILD-FUNCTION
# Runs BUILD-FUNCTION OUTDIR (it must put BINS into OUTDIR/bin) unless the stamp matches KEY.
peer() {
  local name=$1 version=$2 essential=$3 key=$4 bins=$5 build=$6
  local dir=$CACHE/$name-$version b ok=1
  if [ -n "$ONLY" ] && ! [[ " $ONLY " == *" $name "* ]]; then return 0; fi
  # shellcheck disable=SC2086
  if [ -f "$dir/.built" ] && [ "$(cat "$dir/.built")" = "$key" ]; then
    for b in $bins; do [ -x "$dir/bin/$b" ] || ok=0; done
    if [ $ok = 1 ]; then
      link "$name" "$dir" $bins
      record "$name" "$version" cached 0 "$(cat "$dir/.build-info" 2>/dev/null)"
      return 0
    fi
  fi
  if [ -f "$dir.failed" ] && [ "$(head -n1 "$dir.failed")" = "$key" ] &&
    [ "${PULLGATE_TESTBED_RETRY:-0}" != 1 ] && [ "$essential" = no ]; then
    unlink_bins $bins
    record "$name" "$version" failed 0 "(cached failure; PULLGATE_TESTBED_RETRY=1 retries) $(tail -n +2 "$dir.failed")"
    return 0
  fi
  local tmp=$dir.tmp log start secs rc
  rm -rf "$tmp" "$dir.failed"
  mkdir -p "$tmp/bin"
  log=$tmp/build.log
  start=$(date +%s)
  ("$build" "$tmp") >"$log" 2>&1
  rc=$?
  secs=$(($(date +%s) - start))
  for b in $bins; do [ -x "$tmp/bin/$b" ] || { [ $rc != 0 ] || rc=97; echo "missing binary $b" >>"$log"; }; done
  if [ $rc = 0 ]; then
    rm -rf "$dir"
    mv "$tmp" "$dir"
    printf '%s' "$key" >"$dir/.built"
    printf 'built in %ss on %s' "$secs" "$(date -u +%Y-%m-%dT%H:%MZ)" >"$dir/.build-info"
    link "$name" "$dir" $bins
    record "$name" "$version" built "$secs" ""
  else
    local reason
    reason=$(failure_reason "$log")
    mkdir -p "$CACHE/logs"
    cp "$log" "$CACHE/logs/$name-$version.log"
    rm -rf "$tmp"
    unlink_bins $bins
    if ! grep -qiE 'dial tcp|i/o timeout|connection (refused|reset)|TLS handshake|502 Bad|503 Service|504 Gateway|no such host' \
      "$CACHE/logs/$name-$version.log"; then
      printf '%s\n%s\n' "$key" "$reason" >"$dir.failed"
    fi
    record "$name" "$version" failed "$secs" "$reason (log: $CACHE/logs/$name-$version.log)"
    [ "$essential" = yes ] && essential_failed+=("$name")
  fi
  return 0
}

gorun() { nice -n "$NICE" go "$@"; }

# A go.mod recipe's key: the pin plus its go.sum, so editing the recipe rebuilds.
recipe_key() { printf '%s %s %s' "$1" "$goversion" "$(cat "$here/recipes/$2/go.mod" "$here/recipes/$2/go.sum" | sha256sum | cut -c1-16)"; }

# --- the peers, most important first ---------------------------------------------------------

build_cosign() {
  GOBIN=$1/bin gorun install \
    -ldflags "-s -w -X sigs.k8s.io/release-utils/version.gitVersion=$COSIGN_VERSION" \
    "github.com/sigstore/cosign/v3/cmd/cosign@$COSIGN_VERSION"
}
peer cosign "$COSIGN_VERSION" yes "$COSIGN_VERSION $goversion" "cosign" build_cosign

build_crictl() {
  GOBIN=$1/bin gorun install \
    -ldflags "-s -w -X sigs.k8s.io/cri-tools/pkg/version.Version=$CRICTL_VERSION" \
    "sigs.k8s.io/cri-tools/cmd/crictl@$CRICTL_VERSION"
}
peer crictl "$CRICTL_VERSION" yes "$CRICTL_VERSION $goversion" "crictl" build_crictl

build_containerd() {
  local m=github.com/containerd/containerd/v2
  # no_btrfs: the btrfs snapshotter needs cgo and btrfs headers; overlayfs/native are enough.
  GOBIN=$1/bin gorun install -tags "no_btrfs" \
    -ldflags "-s -w -X $m/version.Version=$CONTAINERD_VERSION -X $m/version.Revision=module-proxy" \
    "$m/cmd/containerd@$CONTAINERD_VERSION" "$m/cmd/ctr@$CONTAINERD_VERSION" \
    "$m/cmd/containerd-shim-runc-v2@$CONTAINERD_VERSION"
}
peer containerd "$CONTAINERD_VERSION" no "$CONTAINERD_VERSION $goversion" \
  "containerd ctr containerd-shim-runc-v2" build_containerd

# policy-controller's go.mod has replace directives, which `go install module@version` refuses;
# the recipe (recipes/policy-tester/go.mod) repeats them and pins the tester's module.
build_policy_tester() {
  (cd "$here/recipes/policy-tester" &&
    GOFLAGS="$GOFLAGS -mod=readonly" gorun build -ldflags "-s -w" -o "$1/bin/policy-tester" \
      github.com/sigstore/policy-controller/cmd/tester)
}
if [ -f "$here/recipes/policy-tester/go.sum" ]; then
  peer policy-tester "$POLICY_CONTROLLER_VERSION" no "$(recipe_key "$POLICY_CONTROLLER_VERSION" policy-tester)" \
    "policy-tester" build_policy_tester
else
  record policy-tester "$POLICY_CONTROLLER_VERSION" failed 0 "no recipe (tests/testbed/recipes/policy-tester)"
fi

# k8s.io/kubernetes requires its staging modules at v0.0.0 with `replace => ./staging/…`, which a
# dependent ignores: recipes/kubernetes/go.mod pins each k8s.io/* staging module to v0.<minor>.<patch>.
build_kubernetes() {
  local v=$KUBERNETES_VERSION minor
  minor=$(echo "$v" | cut -d. -f2)
  local ld="-s -w"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld="$ld -X $p.gitVersion=$v -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
    ld="$ld -X $p.buildDate=1970-01-01T00:00:00Z"
  done
  (cd "$here/recipes/kubernetes" &&
    GOFLAGS="$GOFLAGS -mod=readonly" gorun build -ldflags "$ld" -o "$1/bin/" \
      k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubelet \
      k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kube-scheduler)
}
peer kubernetes "$KUBERNETES_VERSION" no "$(recipe_key "$KUBERNETES_VERSION" kubernetes)" \
  "kube-apiserver kubelet kube-controller-manager kube-scheduler" build_kubernetes

# kubectl of the same release (tests/cluster drives the cluster with it; Debian's
# kubernetes-client is 1.20, too old for `create token` and `wait --for=jsonpath`).
# Its own recipe, so it shares the Go build cache but not the other binaries' cache key.
build_kubectl() {
  local v=$KUBERNETES_VERSION minor
  minor=$(echo "$v" | cut -d. -f2)
  local ld="-s -w"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld="$ld -X $p.gitVersion=$v -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
    ld="$ld -X $p.buildDate=1970-01-01T00:00:00Z"
  done
  (cd "$here/recipes/kubectl" &&
    GOFLAGS="$GOFLAGS -mod=readonly" gorun build -ldflags "$ld" -o "$1/bin/" k8s.io/kubernetes/cmd/kubectl)
}
peer kubectl "$KUBERNETES_VERSION" no "$(recipe_key "$KUBERNETES_VERSION" kubectl)" "kubectl" build_kubectl

# go.etcd.io/etcd/server/v3 replaces its sibling modules with ../api etc.: same recipe approach.
build_etcd() {
  (cd "$here/recipes/etcd" &&
    GOFLAGS="$GOFLAGS -mod=readonly" gorun build \
      -ldflags "-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=module-proxy" -o "$1/bin/etcd" \
      go.etcd.io/etcd/server/v3)
}
peer etcd "$ETCD_VERSION" no "$(recipe_key "$ETCD_VERSION" etcd)" "etcd" build_etcd

# --- status ------------------------------------------------------------------------------------
# Merge: peers not run this time (PULLGATE_TESTBED_ONLY) keep their previous line.
if [ -f "$CACHE/status" ]; then
  while IFS=$'\t' read -r n rest; do
    cut -f1 "$status_new" | grep -qx "$n" || printf '%s\t%s\n' "$n" "$rest" >>"$status_new"
  done <"$CACHE/status"
fi
mv "$status_new" "$CACHE/status"
# The built binaries are all later runs need: PULLGATE_TESTBED_PRUNE=1 drops the Go module and
# build caches (several GB) at the price of a slower rebuild when a pin changes.
if [ "${PULLGATE_TESTBED_PRUNE:-0}" = 1 ]; then
  go clean -modcache >/dev/null 2>&1
  go clean -cache >/dev/null 2>&1
  echo "testbed: pruned the Go module and build caches"
fi
echo "testbed: bin dir $BIN ($(($(date +%s) - total_start))s total; status in $CACHE/status;" \
  "cache $(du -sh "$CACHE" 2>/dev/null | cut -f1))"
if [ ${#essential_failed[@]} -gt 0 ]; then
  echo "testbed: essential peer(s) failed: ${essential_failed[*]}" >&2
  exit 1
fi
}

main "$@"
