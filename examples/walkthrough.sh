#!/usr/bin/env bash
# The README walkthrough, end to end, on this machine: a local registry on 127.0.0.1, a demo
# image built with tar/gzip, an allow-list, a no-match denial, and a key-signed policy that
# denies the unsigned image and admits it once it is signed.
# Needs Debian's docker-registry and skopeo. Everything lives in a temp dir and is removed.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
registry_pid=
cleanup() { [ -n "$registry_pid" ] && kill "$registry_pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

cargo build -q --bin pullgate --example cosign_sign
pullgate=${CARGO_TARGET_DIR:-target}/debug/pullgate
# The real cosign CLI when the test bed has it (tests/testbed/install.sh), else the sigstore-crate
# signer (examples/cosign_sign.rs), which writes the same key files and signatures.
cosign=${PULLGATE_TESTBED_BIN:-/var/cache/pullgate-testbed/bin}/cosign
[ -x "$cosign" ] || cosign=
sign=${CARGO_TARGET_DIR:-target}/debug/examples/cosign_sign
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }
expect() { # expect CODE CMD...: run CMD, show its output, fail unless it exits with CODE
  local want=$1; shift; step "$@"; set +e; "$@"; local got=$?; set -e
  [ "$got" = "$want" ] || { echo "walkthrough: expected exit $want, got $got" >&2; exit 1; }
}

# 1. The embedded default: the allow-list admits the demo image without any registry access.
expect 0 $pullgate verify --policy examples/policies --namespace demo docker.io/library/nginx:1.27

# 2. A local registry on a free loopback port.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$work/registry.yml" <<YAML
version: 0.1
log: {level: error, accesslog: {disabled: true}}
storage: {filesystem: {rootdirectory: $work/storage}}
http: {addr: 127.0.0.1:$port}
YAML
docker-registry serve "$work/registry.yml" 2>"$work/registry.log" & registry_pid=$!
for _ in $(seq 50); do curl -fs "http://127.0.0.1:$port/v2/" >/dev/null && break; sleep 0.1; done

# 3. A one-layer demo image, pushed twice: as demo:v1 and as other:v1.
mkdir -p "$work/rootfs" "$work/oci/blobs/sha256"
echo "hello from pullgate" > "$work/rootfs/hello.txt"
tar --sort=name --mtime=@0 --owner=0 --group=0 -C "$work/rootfs" -cf "$work/layer.tar" .
gzip -n -c "$work/layer.tar" > "$work/layer.tar.gz"
blob() { local d; d=$(sha256sum "$1" | cut -d' ' -f1); cp "$1" "$work/oci/blobs/sha256/$d"; echo "$d"; }
diff_id=$(sha256sum "$work/layer.tar" | cut -d' ' -f1)
layer=$(blob "$work/layer.tar.gz")
printf '{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":["sha256:%s"]},"config":{"Cmd":["/hello.txt"]}}' "$diff_id" > "$work/config.json"
config=$(blob "$work/config.json")
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%d},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:%s","size":%d}]}' \
  "$config" "$(stat -c%s "$work/config.json")" "$layer" "$(stat -c%s "$work/layer.tar.gz")" > "$work/manifest.json"
manifest=$(blob "$work/manifest.json")
printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%d,"annotations":{"org.opencontainers.image.ref.name":"v1"}}]}' \
  "$manifest" "$(stat -c%s "$work/manifest.json")" > "$work/oci/index.json"
echo '{"imageLayoutVersion":"1.0.0"}' > "$work/oci/oci-layout"
echo '{"default":[{"type":"insecureAcceptAnything"}]}' > "$work/policy.json"
for repo in demo other; do
  skopeo --policy "$work/policy.json" copy -q --dest-tls-verify=false "oci:$work/oci:v1" "docker://127.0.0.1:$port/$repo:v1"
done

# 4. Policies: the examples, plus a key-signed policy for the demo repository (the key lives in
#    a Secret in cosign-system, as policy-controller expects).
if [ -n "$cosign" ]; then
  mkdir -p "$work/keys"
  step "$cosign" generate-key-pair --output-key-prefix "$work/keys/cosign"
  COSIGN_PASSWORD=walkthrough HOME=$work "$cosign" generate-key-pair --output-key-prefix "$work/keys/cosign"
else
  COSIGN_PASSWORD=walkthrough $sign generate-key-pair "$work/keys"
fi
cp -r examples/policies "$work/policies"
cat > "$work/policies/30-signed-demo.yaml" <<YAML
apiVersion: v1
kind: Secret
metadata: {name: demo-signing-key, namespace: cosign-system}
stringData:
  cosign.pub: |
$(sed 's/^/    /' "$work/keys/cosign.pub")
---
apiVersion: policy.sigstore.dev/v1beta1
kind: ClusterImagePolicy
metadata: {name: signed-demo}
spec:
  images: [{glob: "127.0.0.1:$port/demo*"}]
  authorities: [{key: {secretRef: {name: demo-signing-key}}}]
YAML
expect 0 $pullgate validate "$work/policies"

# 5. An image no policy covers is denied; the unsigned demo image is denied.
expect 1 $pullgate verify --policy "$work/policies" --namespace demo "127.0.0.1:$port/other:v1"
expect 1 $pullgate verify --policy "$work/policies" --namespace demo "127.0.0.1:$port/demo:v1"

# 6. Sign it, and it is admitted. With the real cosign: offline (no Rekor upload, no TUF signing
#    config), plain HTTP to the loopback registry, and the legacy .sig tag the key CIP reads.
if [ -n "$cosign" ]; then
  cosign_sign=("$cosign" sign --key "$work/keys/cosign.key" --tlog-upload=false --use-signing-config=false
    --new-bundle-format=false --allow-http-registry --allow-insecure-registry -y "127.0.0.1:$port/demo:v1")
  step COSIGN_PASSWORD=walkthrough "${cosign_sign[@]}"
  COSIGN_PASSWORD=walkthrough HOME=$work "${cosign_sign[@]}"
else
  step COSIGN_PASSWORD=walkthrough $sign sign "$work/keys/cosign.key" "127.0.0.1:$port/demo:v1"
  COSIGN_PASSWORD=walkthrough $sign sign "$work/keys/cosign.key" "127.0.0.1:$port/demo:v1"
fi
expect 0 $pullgate verify --policy "$work/policies" --namespace demo "127.0.0.1:$port/demo:v1"
# In a namespace that is not enforced, the unlisted image runs.
expect 0 $pullgate verify --policy "$work/policies" --namespace playground "127.0.0.1:$port/other:v1"
printf '\nwalkthrough: all steps behaved as described\n'
