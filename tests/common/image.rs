//! Reproducible one-layer OCI images, built in memory and pushed with oci-client.

use std::io::Write;

use flate2::write::GzEncoder;
use flate2::Compression;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::manifest::{
    IMAGE_CONFIG_MEDIA_TYPE, IMAGE_LAYER_GZIP_MEDIA_TYPE, IMAGE_MANIFEST_LIST_MEDIA_TYPE,
    IMAGE_MANIFEST_MEDIA_TYPE, OCI_IMAGE_INDEX_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE,
};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde_json::json;

use super::registry::Registry;

/// Every manifest media type the helpers ask for.
pub const MANIFEST_ACCEPT: &[&str] = &[
    OCI_IMAGE_MEDIA_TYPE,
    OCI_IMAGE_INDEX_MEDIA_TYPE,
    IMAGE_MANIFEST_MEDIA_TYPE,
    IMAGE_MANIFEST_LIST_MEDIA_TYPE,
];

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
}

/// A one-layer OCI image held in memory. Same seed, same bytes, same digests.
#[derive(Debug, Clone)]
pub struct TestImage {
    /// gzip-compressed tar with one file, `hello`, whose content depends on the seed.
    pub layer: Vec<u8>,
    pub layer_digest: String,
    /// `sha256:` of the uncompressed tar (the config's `rootfs.diff_ids[0]`).
    pub diff_id: String,
    pub config: Vec<u8>,
    pub config_digest: String,
    /// `application/vnd.oci.image.manifest.v1+json` bytes, exactly as pushed.
    pub manifest: Vec<u8>,
    /// `sha256:` of `manifest`: the image digest.
    pub digest: String,
}

impl TestImage {
    /// Builds the image: fixed mtime 0, uid/gid 0, mode 0755, gzip without name or time.
    pub fn build(seed: &str) -> TestImage {
        TestImage::build_with_config(seed, |_| {})
    }

    /// [`TestImage::build`] with its config JSON (linux/amd64, `config.Cmd`, rootfs, history)
    /// changed by `edit` first, e.g. to set `config.Env`, `config.Labels` or `architecture`.
    pub fn build_with_config(seed: &str, edit: impl FnOnce(&mut serde_json::Value)) -> TestImage {
        let content = format!("pullgate test image, seed {seed}\n");
        let mut tar = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_ustar();
        header.set_path("hello").expect("tar path");
        header.set_size(content.len() as u64);
        header.set_mode(0o755);
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_cksum();
        tar.append(&header, content.as_bytes()).expect("tar append");
        let tar = tar.into_inner().expect("tar finish");
        let config = json!({
            "architecture": "amd64",
            "os": "linux",
            "created": "1970-01-01T00:00:00Z",
            "config": { "Cmd": ["/hello"] },
            "rootfs": null,
            "history": [{ "created": "1970-01-01T00:00:00Z", "created_by": format!("pullgate test seed {seed}") }],
        });
        TestImage::from_layer_tar(tar, config, edit)
    }

    /// A runnable image: one layer holding Debian `busybox-static`'s `/bin/busybox` (read from
    /// this machine) with `/bin/sleep` and `/bin/sh` as symlinks to it, entrypoint
    /// `["/bin/sleep", "infinity"]`, for the host's architecture. Serves both as the CRI
    /// plugin's `sandbox_image` (pause) and as an app container image. Built once per test
    /// binary (the layer is about 1 MB gzipped); same bytes every time.
    pub fn busybox() -> TestImage {
        static IMAGE: std::sync::OnceLock<TestImage> = std::sync::OnceLock::new();
        IMAGE
            .get_or_init(|| TestImage::busybox_with_config(|_| {}))
            .clone()
    }

    /// [`TestImage::busybox`] with its config JSON changed by `edit` (not cached), e.g. to make
    /// an image with the same layer but another digest.
    pub fn busybox_with_config(edit: impl FnOnce(&mut serde_json::Value)) -> TestImage {
        let busybox = std::fs::read(BUSYBOX_PATH)
            .unwrap_or_else(|e| panic!("read {BUSYBOX_PATH} (Debian package busybox-static): {e}"));
        let mut tar = tar::Builder::new(Vec::new());
        for dir in ["bin/", "dev/", "etc/", "proc/", "sys/", "tmp/"] {
            let mut header = fixed_header(tar::EntryType::Directory, dir);
            header.set_mode(if dir == "tmp/" { 0o1777 } else { 0o755 });
            header.set_cksum();
            tar.append(&header, std::io::empty()).expect("tar dir");
        }
        let mut header = fixed_header(tar::EntryType::Regular, "bin/busybox");
        header.set_size(busybox.len() as u64);
        header.set_cksum();
        tar.append(&header, busybox.as_slice())
            .expect("tar busybox");
        for applet in ["sh", "sleep"] {
            let mut header = fixed_header(tar::EntryType::Symlink, &format!("bin/{applet}"));
            header.set_mode(0o777);
            header.set_link_name("busybox").expect("symlink target");
            header.set_cksum();
            tar.append(&header, std::io::empty()).expect("tar symlink");
        }
        let tar = tar.into_inner().expect("tar finish");
        let config = json!({
            "architecture": go_arch(),
            "os": "linux",
            "created": "1970-01-01T00:00:00Z",
            "config": {
                "Entrypoint": ["/bin/sleep", "infinity"],
                "Env": ["PATH=/bin"],
                "WorkingDir": "/",
            },
            "rootfs": null,
            "history": [{ "created": "1970-01-01T00:00:00Z", "created_by": "pullgate test busybox" }],
        });
        TestImage::from_layer_tar(tar, config, edit)
    }

    /// An image with `tar` (uncompressed) as its only layer and `config` (whose `rootfs` is
    /// set here; a `"rootfs": null` placeholder keeps its key position) changed by `edit`: gzip without name or time, OCI media types.
    pub fn from_layer_tar(
        tar: Vec<u8>,
        mut config: serde_json::Value,
        edit: impl FnOnce(&mut serde_json::Value),
    ) -> TestImage {
        // GzEncoder::new writes a header with mtime 0 and no file name.
        let mut gz = GzEncoder::new(Vec::new(), Compression::default());
        gz.write_all(&tar).expect("gzip");
        let layer = gz.finish().expect("gzip finish");

        let diff_id = sha256_digest(&tar);
        let layer_digest = sha256_digest(&layer);
        config["rootfs"] = json!({ "type": "layers", "diff_ids": [diff_id] });
        edit(&mut config);
        let config = serde_json::to_vec(&config).expect("config json");
        let config_digest = sha256_digest(&config);
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_IMAGE_MEDIA_TYPE,
            "config": {
                "mediaType": IMAGE_CONFIG_MEDIA_TYPE,
                "digest": config_digest,
                "size": config.len(),
            },
            "layers": [{
                "mediaType": IMAGE_LAYER_GZIP_MEDIA_TYPE,
                "digest": layer_digest,
                "size": layer.len(),
            }],
        }))
        .expect("manifest json");
        let digest = sha256_digest(&manifest);
        TestImage {
            layer,
            layer_digest,
            diff_id,
            config,
            config_digest,
            manifest,
            digest,
        }
    }

    /// The image ID the CRI reports for this image (`sha256:<config digest>`), which kubelet
    /// puts in `ContainerConfig.image.image`.
    pub fn image_id(&self) -> &str {
        &self.config_digest
    }
}

/// Where Debian's `busybox-static` installs its binary.
pub const BUSYBOX_PATH: &str = "/bin/busybox";

/// A tar header for `path` with mtime 0, uid/gid 0 and mode 0755 (checksum not yet set).
fn fixed_header(kind: tar::EntryType, path: &str) -> tar::Header {
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(kind);
    header.set_path(path).expect("tar path");
    header.set_size(0);
    header.set_mode(0o755);
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    header
}

/// This machine's architecture as OCI/Go names it (`amd64`, `arm64`, ...): containerd only
/// unpacks an image whose config matches its platform.
pub fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

impl Registry {
    /// An oci-client speaking plain HTTP to this registry, with its credentials stored.
    pub async fn oci_client(&self) -> (Client, RegistryAuth) {
        let client = Client::new(ClientConfig {
            protocol: ClientProtocol::Http,
            ..Default::default()
        });
        let auth = self.oci_auth();
        client.store_auth_if_needed(&self.addr(), &auth).await;
        (client, auth)
    }

    /// The registry's credentials as oci-client auth.
    pub fn oci_auth(&self) -> RegistryAuth {
        match &self.credentials {
            Some((u, p)) => RegistryAuth::Basic(u.clone(), p.clone()),
            None => RegistryAuth::Anonymous,
        }
    }

    pub(super) fn reference(&self, repo: &str, tag_or_digest: &str) -> Reference {
        if tag_or_digest.contains(':') {
            Reference::with_digest(self.addr(), repo.to_string(), tag_or_digest.to_string())
        } else {
            Reference::with_tag(self.addr(), repo.to_string(), tag_or_digest.to_string())
        }
    }

    /// Builds [`TestImage::build`]`(seed)` and pushes it as `REPO:TAG`; returns the manifest
    /// digest `sha256:…`.
    pub async fn push_image(&self, repo: &str, tag: &str, seed: &str) -> String {
        self.push_test_image(repo, tag, &TestImage::build(seed))
            .await
    }

    /// Builds [`TestImage::busybox`] and pushes it as `REPO:TAG`; returns the image (its
    /// `digest` is the manifest digest, [`TestImage::image_id`] the CRI image ID).
    pub async fn push_busybox(&self, repo: &str, tag: &str) -> TestImage {
        let image = TestImage::busybox();
        self.push_test_image(repo, tag, &image).await;
        image
    }

    /// Pushes an already built image as `REPO:TAG`; returns its digest.
    pub async fn push_test_image(&self, repo: &str, tag: &str, image: &TestImage) -> String {
        self.push_blob(repo, &image.layer).await;
        self.push_blob(repo, &image.config).await;
        self.push_manifest_bytes(repo, tag, OCI_IMAGE_MEDIA_TYPE, &image.manifest)
            .await
    }

    /// Uploads a blob into `repo`; returns its digest.
    pub async fn push_blob(&self, repo: &str, data: &[u8]) -> String {
        let digest = sha256_digest(data);
        let (client, _) = self.oci_client().await;
        let reference = self.reference(repo, "latest");
        client
            .push_blob(&reference, data.to_vec(), &digest)
            .await
            .unwrap_or_else(|e| panic!("push blob {digest} to {repo}: {e}"));
        digest
    }

    /// Pushes manifest bytes as given under `tag_or_digest`; returns their digest.
    pub async fn push_manifest_bytes(
        &self,
        repo: &str,
        tag_or_digest: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> String {
        let (client, _) = self.oci_client().await;
        let reference = self.reference(repo, tag_or_digest);
        client
            .push_manifest_raw(
                &reference,
                bytes.to_vec(),
                media_type.parse().expect("media type header"),
            )
            .await
            .unwrap_or_else(|e| panic!("push manifest {reference}: {e}"));
        sha256_digest(bytes)
    }

    /// Raw manifest bytes at `REPO:TAG` or `REPO@DIGEST`; `None` when the registry says 404.
    pub async fn manifest_bytes(&self, repo: &str, tag_or_digest: &str) -> Option<Vec<u8>> {
        let resp = self.http(
            "GET",
            &format!("/v2/{repo}/manifests/{tag_or_digest}"),
            &[("Accept", &MANIFEST_ACCEPT.join(", "))],
        );
        match resp.status {
            200 => Some(resp.body),
            404 => None,
            s => panic!(
                "GET manifest {repo}:{tag_or_digest}: HTTP {s}: {}",
                String::from_utf8_lossy(&resp.body)
            ),
        }
    }

    /// Digest the registry reports for `REPO:TAG` (HEAD, `Docker-Content-Digest`); `None` on 404.
    pub async fn manifest_digest(&self, repo: &str, tag: &str) -> Option<String> {
        let resp = self.http(
            "HEAD",
            &format!("/v2/{repo}/manifests/{tag}"),
            &[("Accept", &MANIFEST_ACCEPT.join(", "))],
        );
        match resp.status {
            200 => Some(
                resp.header("docker-content-digest")
                    .expect("Docker-Content-Digest header")
                    .to_string(),
            ),
            404 => None,
            s => panic!("HEAD manifest {repo}:{tag}: HTTP {s}"),
        }
    }

    /// Points `REPO:NEW_TAG` at the manifest `digest` (same bytes re-pushed), e.g. to simulate
    /// a tag that moved.
    pub async fn tag(&self, repo: &str, digest: &str, new_tag: &str) {
        let bytes = self
            .manifest_bytes(repo, digest)
            .await
            .unwrap_or_else(|| panic!("no manifest {repo}@{digest}"));
        let media_type = media_type_of(&bytes);
        let pushed = self
            .push_manifest_bytes(repo, new_tag, &media_type, &bytes)
            .await;
        assert_eq!(pushed, digest, "re-pushed manifest changed digest");
    }

    /// Deletes the blob `digest` from `repo` (the registry then answers 404 for it there).
    pub async fn delete_blob(&self, repo: &str, digest: &str) {
        let resp = self.http("DELETE", &format!("/v2/{repo}/blobs/{digest}"), &[]);
        assert_eq!(
            resp.status,
            202,
            "DELETE blob {repo}@{digest}: {}",
            String::from_utf8_lossy(&resp.body)
        );
    }

    /// Deletes the manifest `digest` from `repo` (and so every tag pointing at it).
    pub async fn delete_manifest(&self, repo: &str, digest: &str) {
        let resp = self.http("DELETE", &format!("/v2/{repo}/manifests/{digest}"), &[]);
        assert_eq!(
            resp.status,
            202,
            "DELETE {repo}@{digest}: {}",
            String::from_utf8_lossy(&resp.body)
        );
    }

    /// Pushes an OCI image index over manifests already in `repo`, one `(digest, arch)` per
    /// entry (os linux); returns the index digest.
    pub async fn push_index(&self, repo: &str, tag: &str, entries: &[(&str, &str)]) -> String {
        let mut manifests = Vec::new();
        for (digest, arch) in entries {
            let bytes = self
                .manifest_bytes(repo, digest)
                .await
                .unwrap_or_else(|| panic!("no manifest {repo}@{digest}"));
            manifests.push(json!({
                "mediaType": media_type_of(&bytes),
                "digest": digest,
                "size": bytes.len(),
                "platform": { "architecture": arch, "os": "linux" },
            }));
        }
        let index = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_IMAGE_INDEX_MEDIA_TYPE,
            "manifests": manifests,
        }))
        .expect("index json");
        self.push_manifest_bytes(repo, tag, OCI_IMAGE_INDEX_MEDIA_TYPE, &index)
            .await
    }
}

/// The `mediaType` field of a manifest, defaulting to the OCI image manifest type.
pub fn media_type_of(manifest: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(manifest)
        .ok()
        .and_then(|v| v.get("mediaType")?.as_str().map(str::to_string))
        .unwrap_or_else(|| OCI_IMAGE_MEDIA_TYPE.to_string())
}
