//! cosign-format signatures (`sha256-<hex>.sig` tags with simple-signing layers).

use std::collections::BTreeMap;

use oci_client::manifest::{OciImageManifest, IMAGE_CONFIG_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE};
use serde_json::json;
use sigstore::cosign::constraint::PrivateKeySigner;
use sigstore::cosign::{ClientBuilder, Constraint, CosignCapabilities, SignatureLayer};
use sigstore::registry::{Auth, ClientConfig, ClientProtocol, OciReference};

use super::image::sha256_digest;
use super::keys::TestKey;
use super::registry::Registry;
use super::rekor::TestRekor;

/// Layer media type of a cosign simple-signing signature.
pub const SIMPLESIGNING_MEDIA_TYPE: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// Layer annotation holding the base64 signature.
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
/// Layer annotation holding the Rekor bundle JSON.
pub const BUNDLE_ANNOTATION: &str = "dev.sigstore.cosign/bundle";
/// Layer annotation holding a PEM certificate (keyless).
pub const CERTIFICATE_ANNOTATION: &str = "dev.sigstore.cosign/certificate";
/// Layer annotation holding a PEM chain (keyless).
pub const CHAIN_ANNOTATION: &str = "dev.sigstore.cosign/chain";

/// cosign's signature tag for an image digest: `sha256:abc…` → `sha256-abc….sig`.
pub fn signature_tag(digest: &str) -> String {
    format!("{}.sig", digest.replace(':', "-"))
}

/// One layer of a signature manifest: the payload blob and the layer's annotations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigLayer {
    pub payload: Vec<u8>,
    pub annotations: BTreeMap<String, String>,
}

impl SigLayer {
    /// A layer with `payload` and the signature annotation.
    pub fn new(payload: Vec<u8>, signature_b64: &str) -> SigLayer {
        SigLayer {
            payload,
            annotations: BTreeMap::from([(SIGNATURE_ANNOTATION.to_string(), signature_b64.into())]),
        }
    }

    pub fn with_annotation(mut self, key: &str, value: &str) -> SigLayer {
        self.annotations.insert(key.to_string(), value.to_string());
        self
    }

    pub fn signature_b64(&self) -> Option<&str> {
        self.annotations
            .get(SIGNATURE_ANNOTATION)
            .map(String::as_str)
    }

    pub fn bundle(&self) -> Option<&str> {
        self.annotations.get(BUNDLE_ANNOTATION).map(String::as_str)
    }

    /// The payload parsed as JSON (panics when it is not JSON).
    pub fn payload_json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.payload).expect("signature payload is JSON")
    }

    /// `critical.image.docker-manifest-digest` of the payload.
    pub fn signed_digest(&self) -> Option<String> {
        self.payload_json()
            .pointer("/critical/image/docker-manifest-digest")?
            .as_str()
            .map(str::to_string)
    }
}

/// The simple-signing payload sigstore builds for `docker_reference` (`HOST/REPO`, written
/// as given, like the cosign CLI) and `digest`, signed with `key` through `PrivateKeySigner` —
/// what `cosign sign --key` produces.
pub fn cosign_sign_layer(docker_reference: &str, digest: &str, key: &TestKey) -> SigLayer {
    sigstore_signed_layer(docker_reference, digest, key).1
}

fn sigstore_signed_layer(
    docker_reference: &str,
    digest: &str,
    key: &TestKey,
) -> (SignatureLayer, SigLayer) {
    let image_ref: OciReference = docker_reference
        .parse()
        .unwrap_or_else(|e| panic!("reference {docker_reference}: {e}"));
    let mut layer = SignatureLayer::new_unsigned(&image_ref, digest).expect("unsigned layer");
    // sigstore writes the reference with a default `:latest` tag; the cosign CLI writes the
    // bare repository (`HOST/REPO`). Keep cosign's form; the signer serialises it afresh.
    layer.simple_signing.critical.identity.docker_reference = docker_reference.to_string();
    let signed = PrivateKeySigner::new_with_signer(key.signer())
        .add_constraint(&mut layer)
        .expect("sign layer");
    assert!(signed, "PrivateKeySigner refused to sign");
    let signature = layer.signature.clone().expect("signature set");
    let ours = SigLayer::new(layer.raw_data.clone(), &signature);
    (layer, ours)
}

/// A simple-signing payload as cosign writes it, built by hand (no signature), for tests that
/// need odd payloads: `{"critical":{"identity":{"docker-reference":R},"image":
/// {"docker-manifest-digest":D},"type":"cosign container image signature"},"optional":null}`.
pub fn simple_signing_payload(docker_reference: &str, digest: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "critical": {
            "identity": { "docker-reference": docker_reference },
            "image": { "docker-manifest-digest": digest },
            "type": "cosign container image signature",
        },
        "optional": null,
    }))
    .expect("payload json")
}

impl Registry {
    /// A sigstore cosign client for this registry (plain HTTP). Pass a trust root to have it
    /// verify Rekor bundles (see [`TestRekor::trust_root`]).
    pub fn cosign_client(
        &self,
        trust: Option<&sigstore::trust::ManualTrustRoot<'_>>,
    ) -> sigstore::cosign::Client {
        let mut builder = ClientBuilder::default().with_oci_client_config(ClientConfig {
            protocol: ClientProtocol::Http,
            ..Default::default()
        });
        if let Some(trust) = trust {
            builder = builder
                .with_trust_repository(trust)
                .expect("trust repository");
        }
        builder.build().expect("cosign client")
    }

    /// The registry's credentials as sigstore auth.
    pub fn sigstore_auth(&self) -> Auth {
        match &self.credentials {
            Some((u, p)) => Auth::Basic(u.clone(), p.clone()),
            None => Auth::Anonymous,
        }
    }

    /// `HOST:PORT/REPO`, the docker-reference cosign puts in the payload.
    pub fn repo_ref(&self, repo: &str) -> String {
        format!("{}/{repo}", self.addr())
    }

    /// Signs `REPO@DIGEST` with `key` and pushes the signature with sigstore's `push_signature`
    /// to `REPO:sha256-<hex>.sig`. Replaces any signature already there (sigstore-rs semantics;
    /// the cosign CLI appends — see [`Registry::sign_append`]).
    pub async fn sign(&self, repo: &str, digest: &str, key: &TestKey) -> SigLayer {
        self.sign_into(repo, repo, digest, key).await
    }

    /// Like [`Registry::sign`] but stores the signature in `sig_repo` (same registry), under
    /// `sha256-<hex>.sig` of the image digest: cosign's `COSIGN_REPOSITORY`, a CIP's
    /// `source.oci`. The payload still names `HOST/REPO`.
    pub async fn sign_into(
        &self,
        sig_repo: &str,
        repo: &str,
        digest: &str,
        key: &TestKey,
    ) -> SigLayer {
        let (layer, out) = sigstore_signed_layer(&self.repo_ref(repo), digest, key);
        let target =
            OciReference::with_tag(self.addr(), sig_repo.to_string(), signature_tag(digest));
        self.cosign_client(None)
            .push_signature(None, &self.sigstore_auth(), &target, vec![layer])
            .await
            .unwrap_or_else(|e| panic!("push signature {target}: {e}"));
        out
    }

    /// Signs `REPO@DIGEST` and appends the layer to the existing `.sig` manifest (old layers and
    /// their annotations kept), as the cosign CLI does; creates it when absent.
    pub async fn sign_append(&self, repo: &str, digest: &str, key: &TestKey) -> SigLayer {
        let layer = cosign_sign_layer(&self.repo_ref(repo), digest, key);
        self.push_signature_layers(
            repo,
            &signature_tag(digest),
            std::slice::from_ref(&layer),
            true,
        )
        .await;
        layer
    }

    /// Signs `REPO@DIGEST`, logs it in `rekor` at `integrated_time`, and appends the layer with
    /// its `dev.sigstore.cosign/bundle` annotation.
    pub async fn sign_with_bundle(
        &self,
        repo: &str,
        digest: &str,
        key: &TestKey,
        rekor: &TestRekor,
        integrated_time: i64,
    ) -> SigLayer {
        let layer = cosign_sign_layer(&self.repo_ref(repo), digest, key);
        let bundle = rekor.bundle_for(
            &layer.payload,
            layer.signature_b64().expect("signature"),
            &key.public_pem(),
            integrated_time,
        );
        let layer = layer.with_annotation(BUNDLE_ANNOTATION, &bundle);
        self.push_signature_layers(
            repo,
            &signature_tag(digest),
            std::slice::from_ref(&layer),
            true,
        )
        .await;
        layer
    }

    /// Pushes a cosign-shaped signature manifest with one layer: `payload` as the blob, the
    /// signature annotation set to `signature_b64`, plus `annotations` (which may override it).
    /// Replaces whatever `REPO:TAG` held. Returns the signature manifest digest.
    pub async fn push_signature_raw(
        &self,
        repo: &str,
        tag: &str,
        payload: &[u8],
        signature_b64: &str,
        annotations: BTreeMap<String, String>,
    ) -> String {
        let mut layer = SigLayer::new(payload.to_vec(), signature_b64);
        layer.annotations.extend(annotations);
        self.push_signature_layers(repo, tag, &[layer], false).await
    }

    /// Pushes a signature manifest (simple-signing layers, `{}` config) to `REPO:TAG`. With
    /// `append`, the layers of the manifest already at `REPO:TAG` come first, untouched.
    /// Returns the signature manifest digest.
    pub async fn push_signature_layers(
        &self,
        repo: &str,
        tag: &str,
        layers: &[SigLayer],
        append: bool,
    ) -> String {
        let mut descriptors: Vec<serde_json::Value> = Vec::new();
        let existing = match append {
            true => self.manifest_bytes(repo, tag).await,
            false => None,
        };
        if let Some(existing) = existing {
            let manifest: OciImageManifest =
                serde_json::from_slice(&existing).expect("existing signature manifest");
            for layer in manifest.layers {
                descriptors.push(serde_json::to_value(layer).expect("descriptor json"));
            }
        }
        for layer in layers {
            let digest = self.push_blob(repo, &layer.payload).await;
            descriptors.push(json!({
                "mediaType": SIMPLESIGNING_MEDIA_TYPE,
                "digest": digest,
                "size": layer.payload.len(),
                "annotations": layer.annotations,
            }));
        }
        let config = b"{}";
        let config_digest = self.push_blob(repo, config).await;
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_IMAGE_MEDIA_TYPE,
            "config": {
                "mediaType": IMAGE_CONFIG_MEDIA_TYPE,
                "digest": config_digest,
                "size": config.len(),
            },
            "layers": descriptors,
        }))
        .expect("signature manifest json");
        self.push_manifest_bytes(repo, tag, OCI_IMAGE_MEDIA_TYPE, &manifest)
            .await
    }

    /// The layers of the signature manifest at `REPO:sha256-<hex>.sig` for `digest`; `None`
    /// when there is no such tag.
    pub async fn signatures(&self, repo: &str, digest: &str) -> Option<Vec<SigLayer>> {
        self.signature_layers_at(repo, &signature_tag(digest)).await
    }

    /// The layers (payload blob + annotations) of the signature manifest at `REPO:TAG`.
    pub async fn signature_layers_at(&self, repo: &str, tag: &str) -> Option<Vec<SigLayer>> {
        let bytes = self.manifest_bytes(repo, tag).await?;
        let manifest: OciImageManifest =
            serde_json::from_slice(&bytes).expect("signature manifest");
        let (client, _) = self.oci_client().await;
        let reference = self.reference(repo, tag);
        let mut out = Vec::new();
        for layer in &manifest.layers {
            let mut payload = Vec::new();
            client
                .pull_blob(&reference, layer, &mut payload)
                .await
                .unwrap_or_else(|e| panic!("pull blob {}: {e}", layer.digest));
            assert_eq!(sha256_digest(&payload), layer.digest, "blob digest");
            out.push(SigLayer {
                payload,
                annotations: layer.annotations.clone().unwrap_or_default(),
            });
        }
        Some(out)
    }
}
