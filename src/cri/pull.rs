//! `PullImage`: decide, then forward the pull pinned to the verified digest and record the
//! requested tag in containerd, or deny with kubelet's `SignatureValidationFailed` reason.

use base64::Engine as _;
use bytes::Bytes;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::{
    CreateImageRequest, GetImageRequest, Image, UpdateImageRequest,
};
use containerd_client::with_namespace;
use prost::Message as _;
use tonic::{Code, Request, Response, Status};
use tracing::Instrument as _;

use super::api::{AuthConfig, ImageSpec, PullImageRequest};
use super::{refusal, sandbox_object, Gate, Proxy, K8S_NAMESPACE, PULL_IMAGE_PATH};
use crate::audit::Source;
use crate::engine::Request as EngineRequest;
use crate::image_ref::{ImageRef, DOCKER_HUB};
use crate::registry::Credential;

/// The credential kubelet resolved for this pull, reused for signature fetches.
pub(super) fn credential(auth: &AuthConfig) -> Option<Credential> {
    if !auth.registry_token.is_empty() {
        return Some(Credential::Bearer(auth.registry_token.clone()));
    }
    if !auth.username.is_empty() {
        return Some(Credential::Basic {
            username: auth.username.clone(),
            password: auth.password.clone(),
        });
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(auth.auth.trim())
        .ok()
        .and_then(|d| String::from_utf8(d).ok())?;
    let (username, password) = decoded.split_once(':')?;
    Some(Credential::Basic {
        username: username.to_string(),
        password: password.to_string(),
    })
}

/// The name containerd gives an image: Docker Hub is `docker.io` there.
pub(super) fn containerd_name(image: &ImageRef) -> String {
    let registry = match image.registry() {
        DOCKER_HUB => "docker.io",
        other => other,
    };
    format!("{registry}/{}", image.repository())
}

pub async fn pull_image(proxy: &Proxy, req: Request<Bytes>) -> Result<Response<Bytes>, Status> {
    let (metadata, extensions, raw) = req.into_parts();
    let msg = PullImageRequest::decode(raw.clone())
        .map_err(|e| Status::invalid_argument(format!("malformed PullImageRequest: {e}")))?;
    let requested = msg
        .image
        .as_ref()
        .map(|i| i.image.clone())
        .unwrap_or_default();
    let sandbox = msg
        .sandbox_config
        .as_ref()
        .and_then(|c| c.metadata.as_ref());
    let namespace = sandbox
        .map(|m| m.namespace.as_str())
        .filter(|s| !s.is_empty());
    let pod = sandbox.map(|m| m.name.as_str()).filter(|s| !s.is_empty());
    // What kubelet tells of the pod: CIP-level policies may read its metadata.
    let object = msg.sandbox_config.as_ref().map(sandbox_object);
    let auth = msg.auth.as_ref().and_then(credential);
    let span = tracing::info_span!("pull", image = %requested, namespace, pod);

    async move {
        let request = EngineRequest {
            pod,
            auth: auth.as_ref(),
            object: object.as_ref(),
            ..EngineRequest::new(Source::CriPull, namespace)
        };
        let engine = match proxy.gate(namespace)? {
            Gate::Decide(engine) => engine,
            Gate::Forward => {
                return proxy
                    .forward(
                        PULL_IMAGE_PATH,
                        Request::from_parts(metadata, extensions, raw),
                    )
                    .await
            }
        };
        let outcome = engine.decide(&requested, &request).await;
        if !outcome.decision.verdict.admits() {
            return Err(refusal(&outcome.decision, "pull denied"));
        }
        if let Some(image) = &outcome.image {
            proxy.pull_credentials.remember(image, auth.as_ref());
        }
        let (Some(image), Some(pinned)) = (outcome.image, outcome.pinned) else {
            // Decided without a digest (not enforced, static pass, no-match allow): nothing
            // was verified, so nothing needs pinning.
            return proxy
                .forward(
                    PULL_IMAGE_PATH,
                    Request::from_parts(metadata, extensions, raw),
                )
                .await;
        };
        let pinned_name = format!(
            "{}@{}",
            containerd_name(&pinned),
            pinned.digest().unwrap_or_default()
        );
        // Protobuf merge: a second `image` field appended to the original bytes overrides
        // only `image.image`; every other field, known to pullgate or not, survives.
        let mut bytes = raw.to_vec();
        PullImageRequest {
            image: Some(ImageSpec {
                image: pinned_name,
                ..ImageSpec::default()
            }),
            auth: None,
            sandbox_config: None,
        }
        .encode(&mut bytes)
        .map_err(|e| Status::internal(format!("cannot encode the pinned request: {e}")))?;
        let response = proxy
            .forward(
                PULL_IMAGE_PATH,
                Request::from_parts(metadata, extensions, Bytes::from(bytes)),
            )
            .await?;
        if image.digest().is_none() {
            if let Err(e) = record_tag(proxy, &image, &pinned).await {
                // The pull succeeded; kubelet only loses the tag shortcut and pulls again.
                tracing::warn!(error = %e, "cannot record the tag in containerd");
            }
        }
        Ok(response)
    }
    .instrument(span)
    .await
}

/// Records `image`'s tag in containerd's `k8s.io` namespace, pointing at the record the pinned
/// pull created, so `ImageStatus(tag)` finds it and `IfNotPresent` pods do not pull again.
async fn record_tag(proxy: &Proxy, image: &ImageRef, pinned: &ImageRef) -> Result<(), Status> {
    let mut client = ImagesClient::new(proxy.containerd.clone());
    let by_digest = format!(
        "{}@{}",
        containerd_name(pinned),
        pinned.digest().unwrap_or_default()
    );
    let tag_name = format!(
        "{}:{}",
        containerd_name(image),
        image.tag().unwrap_or("latest")
    );
    // Both records at once: on a repeated pull the tag already points at the digest and
    // nothing needs writing, so the whole step costs one round trip.
    let mut tag_client = client.clone();
    let (pinned_record, tag_record) = tokio::join!(
        client.get(with_namespace!(
            GetImageRequest { name: by_digest },
            K8S_NAMESPACE
        )),
        tag_client.get(with_namespace!(
            GetImageRequest {
                name: tag_name.clone()
            },
            K8S_NAMESPACE
        )),
    );
    let found = pinned_record?
        .into_inner()
        .image
        .ok_or_else(|| Status::not_found("the pinned image record is missing"))?;
    let existing = match tag_record {
        Ok(r) => r.into_inner().image,
        Err(s) if s.code() == Code::NotFound => None,
        Err(s) => return Err(s),
    };
    if let Some(existing) = &existing {
        if existing.target == found.target && existing.labels == found.labels {
            return Ok(());
        }
    }
    let record = Image {
        name: tag_name,
        labels: found.labels,
        target: found.target,
        created_at: None,
        updated_at: None,
    };
    if existing.is_none() {
        let create = CreateImageRequest {
            image: Some(record.clone()),
            source_date_epoch: None,
        };
        match client.create(with_namespace!(create, K8S_NAMESPACE)).await {
            Ok(_) => return Ok(()),
            // A concurrent pull of the same tag created it first: update it instead.
            Err(s) if s.code() == Code::AlreadyExists => {}
            Err(s) => return Err(s),
        }
    }
    let update = UpdateImageRequest {
        image: Some(record),
        update_mask: None,
        source_date_epoch: None,
    };
    client
        .update(with_namespace!(update, K8S_NAMESPACE))
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_from_kubelet_auth() {
        let basic = AuthConfig {
            username: "u".into(),
            password: "p".into(),
            ..AuthConfig::default()
        };
        assert!(matches!(credential(&basic), Some(Credential::Basic { .. })));
        let encoded = AuthConfig {
            auth: base64::engine::general_purpose::STANDARD.encode("a:b"),
            ..AuthConfig::default()
        };
        assert_eq!(
            credential(&encoded),
            Some(Credential::Basic {
                username: "a".into(),
                password: "b".into()
            })
        );
        let token = AuthConfig {
            registry_token: "t".into(),
            ..AuthConfig::default()
        };
        assert_eq!(credential(&token), Some(Credential::Bearer("t".into())));
        assert_eq!(credential(&AuthConfig::default()), None);
    }

    #[test]
    fn appended_override_replaces_only_the_image() {
        let original = PullImageRequest {
            image: Some(ImageSpec {
                image: "ghcr.io/a/b:1".into(),
                annotations: [("k".to_string(), "v".to_string())].into(),
                user_specified_image: "b:1".into(),
                runtime_handler: "runc".into(),
                image_ref: "sha256:11".into(),
            }),
            auth: Some(AuthConfig {
                username: "u".into(),
                ..AuthConfig::default()
            }),
            sandbox_config: None,
        };
        let mut bytes = original.encode_to_vec();
        PullImageRequest {
            image: Some(ImageSpec {
                image: "ghcr.io/a/b@sha256:00".into(),
                ..ImageSpec::default()
            }),
            auth: None,
            sandbox_config: None,
        }
        .encode(&mut bytes)
        .unwrap();
        let merged = PullImageRequest::decode(bytes.as_slice()).unwrap();
        let spec = merged.image.unwrap();
        assert_eq!(spec.image, "ghcr.io/a/b@sha256:00");
        assert_eq!(spec.annotations.get("k").map(String::as_str), Some("v"));
        assert_eq!(spec.user_specified_image, "b:1");
        assert_eq!(spec.runtime_handler, "runc");
        assert_eq!(spec.image_ref, "sha256:11");
        assert_eq!(merged.auth.unwrap().username, "u");
    }
}
