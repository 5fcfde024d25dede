#!/usr/bin/env python3
"""Writes an OCI image layout holding one busybox-static layer (bin/busybox + sh/sleep links).

usage: mkimage.py OUT_DIR TAG [SEED]  -- the layout is pushed with `skopeo copy oci:OUT_DIR:TAG ...`.
A SEED adds /etc/seed holding it, so images differ by digest. The config's Cmd sleeps forever, so the same image serves as the pod sandbox (pause) image.
"""
import hashlib, io, json, os, sys, tarfile

out, tag = sys.argv[1], sys.argv[2]
seed = sys.argv[3] if len(sys.argv) > 3 else None
blobs = os.path.join(out, "blobs", "sha256")
os.makedirs(blobs, exist_ok=True)

def put(data):
    d = hashlib.sha256(data).hexdigest()
    with open(os.path.join(blobs, d), "wb") as f:
        f.write(data)
    return "sha256:" + d, len(data)

buf = io.BytesIO()
with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
    for d in ("bin", "etc", "tmp"):
        ti = tarfile.TarInfo(d); ti.type = tarfile.DIRTYPE; ti.mode = 0o755; tar.addfile(ti)
    data = open("/bin/busybox", "rb").read()
    ti = tarfile.TarInfo("bin/busybox"); ti.size = len(data); ti.mode = 0o755
    tar.addfile(ti, io.BytesIO(data))
    for name in ("sh", "sleep", "echo", "cat", "ls"):
        ti = tarfile.TarInfo("bin/" + name); ti.type = tarfile.SYMTYPE; ti.linkname = "busybox"
        tar.addfile(ti)
    if seed is not None:
        ti = tarfile.TarInfo("etc/seed"); ti.size = len(seed.encode()); ti.mode = 0o644
        tar.addfile(ti, io.BytesIO(seed.encode()))
layer = buf.getvalue()
layer_digest, layer_size = put(layer)
config = {
    "architecture": "amd64", "os": "linux",
    "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sleep", "2147483647"]},
    "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
}
config_digest, config_size = put(json.dumps(config, sort_keys=True).encode())
manifest = {
    "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
               "digest": config_digest, "size": config_size},
    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": layer_digest, "size": layer_size}],
}
m_digest, m_size = put(json.dumps(manifest, sort_keys=True).encode())
with open(os.path.join(out, "index.json"), "w") as f:
    json.dump({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": m_digest,
        "size": m_size, "annotations": {"org.opencontainers.image.ref.name": tag}}]}, f)
with open(os.path.join(out, "oci-layout"), "w") as f:
    json.dump({"imageLayoutVersion": "1.0.0"}, f)
print(m_digest)
