#!/usr/bin/env bash
# Maintainer tool: regenerates the go.mod/go.sum recipes under tests/testbed/recipes/ from the pins
# in tests/testbed/versions.env. Run it after bumping KUBERNETES_VERSION, ETCD_VERSION or
# POLICY_CONTROLLER_VERSION and commit the result (install.sh builds with -mod=readonly from them).
#
# Why recipes at all: `go install module/cmd@version` refuses a module whose go.mod has replace
# directives. k8s.io/kubernetes replaces its k8s.io/* staging modules with ./staging/…; etcd's
# server module replaces its siblings with ../api etc.; policy-controller replaces three modules.
# A recipe is a tiny module that requires the peer and repeats (or resolves) those replacements.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/../versions.env"
export GOTOOLCHAIN=local GOFLAGS=-mod=mod
only=${1:-kubernetes kubectl etcd policy-tester}

gomod_of() { go mod download -json "$1" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p'; }

tools_go() { # tools_go PKG...
  printf '//go:build tools\n\n// Package recipe pins the test-bed peer built by tests/testbed/install.sh.\npackage recipe\n\nimport (\n'
  for p in "$@"; do printf '\t_ "%s"\n' "$p"; done
  printf ')\n'
}

for r in $only; do
  d=$here/$r
  mkdir -p "$d"
  rm -f "$d/go.mod" "$d/go.sum"
  case $r in
  kubernetes | kubectl)
    # kubectl: the same pins in a recipe of its own, so adding it did not rebuild the others.
    v=$KUBERNETES_VERSION
    staging_v=v0.${v#v1.}
    {
      printf 'module pullgate.test/testbed/%s\n\ngo 1.26\n\nrequire k8s.io/kubernetes %s\n\n' "$r" "$v"
      printf '// k8s.io/kubernetes requires its staging modules at v0.0.0 and replaces them with ./staging/…;\n'
      printf '// a dependent must pin each to the release matching %s.\nreplace (\n' "$v"
      grep -E '=> \./staging/' "$(gomod_of "k8s.io/kubernetes@$v")" | awk -v sv="$staging_v" '{print "\t" $1 " => " $1 " " sv}'
      printf ')\n'
    } >"$d/go.mod"
    if [ "$r" = kubectl ]; then
      tools_go k8s.io/kubernetes/cmd/kubectl >"$d/tools.go"
    else
      tools_go k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubelet \
        k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kube-scheduler >"$d/tools.go"
    fi
    ;;
  etcd)
    v=$ETCD_VERSION
    {
      printf 'module pullgate.test/testbed/etcd\n\ngo 1.26\n\nrequire go.etcd.io/etcd/server/v3 %s\n\n' "$v"
      printf '// go.etcd.io/etcd/server/v3 replaces its sibling modules with ../…; pin them to the same release.\nreplace (\n'
      grep -E '=> \.\./' "$(gomod_of "go.etcd.io/etcd/server/v3@$v")" | awk -v v="$v" '{print "\t" $1 " => " $1 " " v}'
      printf ')\n'
    } >"$d/go.mod"
    tools_go go.etcd.io/etcd/server/v3 >"$d/tools.go"
    ;;
  policy-tester)
    v=$POLICY_CONTROLLER_VERSION
    {
      printf 'module pullgate.test/testbed/policy-tester\n\ngo 1.26\n\nrequire github.com/sigstore/policy-controller %s\n\n' "$v"
      printf '// The replace directives of policy-controller %s go.mod, repeated (a dependent ignores them).\n' "$v"
      awk '/^replace \(/{f=1;next} f&&/^\)/{f=0} f&&/=>/{print "replace " $0} /^replace [^(]/{print}' \
        "$(gomod_of "github.com/sigstore/policy-controller@$v")" | sed 's/^replace[ \t]*/replace /'
    } >"$d/go.mod"
    tools_go github.com/sigstore/policy-controller/cmd/tester >"$d/tools.go"
    ;;
  esac
  (cd "$d" && go mod tidy)
  echo "recipe $r: $(grep -c . "$d/go.sum") go.sum lines"
done
