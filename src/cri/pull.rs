//! `PullImage`: decide, then forward the pull pinned to the verified digest and record the
//! requested tag in containerd, or deny with kubelet's `SignatureValidationFailed` reason.

use std::time::Instant;

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
use super::{Proxy, K8S_NAMESPACE, PULL_IMAGE_PATH};
use crate::audit::{AuditLine, Source};
use crate::decide::{decide_in, Context};
use crate::image_ref::{ImageRef, DOCKER_HUB};
use crate::policy::eval::{decide_offline, object_cache_key, Decision, Offline, Verdict};
use crate::policy::object::AdmissionObject;
use crate::registry::Credential;
use crate::verify::cache::CacheKey;

/// kubelet shows this as the pod's waiting reason when a pull error starts with it.
pub const DENY_PREFIX: &str = "SignatureValidationFailed: ";

/// The credential kubelet resolved for this pull, reused for signature fetches.
fn credential(auth: &AuthConfig) -> Option<Credential> {
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
fn containerd_name(image: &ImageRef) -> String {
    let registry = match image.registry() {
        DOCKER_HUB => "docker.io",
        other => other,
    };
    format!("{registry}/{}", image.repository())
}

/// A decision for a request that could not even be parsed.
fn unparsable(image: &str, namespace: Option<&str>, reason: String) -> Decision {
    Decision {
        image: image.to_string(),
        digest: None,
        namespace: namespace.map(str::to_string),
        enforced: true,
        verdict: Verdict::Error,
        reasons: vec![reason],
        policies: Vec::new(),
    }
}

pub async fn pull_image(proxy: &Proxy, req: Request<Bytes>) -> Result<Response<Bytes>, Status> {
    let started = Instant::now();
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
    let object = msg.sandbox_config.as_ref().map(|c| {
        let m = c.metadata.clone().unwrap_or_default();
        AdmissionObject::from_pod_sandbox(&m.name, &m.namespace, &m.uid, &c.labels, &c.annotations)
    });
    let auth = msg.auth.as_ref().and_then(credential);
    let span = tracing::info_span!("pull", image = %requested, namespace, pod);

    async move {
        let (decision, cache_hit, pinned) = match ImageRef::parse(&requested) {
            Err(e) => (unparsable(&requested, namespace, e.to_string()), false, None),
            Ok(image) => {
                let context = Context {
                    namespace,
                    auth: auth.as_ref(),
                    signature_auth: None,
                    object: object.as_ref(),
                };
                decide_pull(proxy, &image, &context).await
            }
        };
        proxy.audit.record(&AuditLine::new(
            Source::CriPull,
            &proxy.node,
            pod,
            &decision,
            cache_hit,
            started.elapsed(),
        ));
        if !decision.verdict.admits() {
            tracing::warn!(verdict = decision.verdict.as_str(), reasons = ?decision.reasons, "pull denied");
            return Err(Status::unknown(format!(
                "{DENY_PREFIX}{}",
                decision.reasons.join("; ")
            )));
        }
        let Some((image, pinned)) = pinned else {
            // Decided without a digest (not enforced, static pass, no-match allow): nothing
            // was verified, so nothing needs pinning.
            return proxy
                .forward(PULL_IMAGE_PATH, Request::from_parts(metadata, extensions, raw))
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

/// The decision, whether it came from the cache, and (image, image pinned to the verified
/// digest) when signatures were verified.
async fn decide_pull(
    proxy: &Proxy,
    image: &ImageRef,
    context: &Context<'_>,
) -> (Decision, bool, Option<(ImageRef, ImageRef)>) {
    let snapshot = proxy.policies.current();
    let namespace = context.namespace;
    if let Offline::Decided(d) = decide_offline(&snapshot, image, namespace, context.object) {
        return (d, false, None);
    }
    // Tags move: resolve on every pull, then cache by digest.
    let digest = match proxy.registry.resolve(image, context.auth).await {
        Ok(d) => d,
        Err(e) => {
            let mut d = Decision::new(image, namespace, true);
            d.verdict = Verdict::Error;
            d.reasons = vec![format!("could not verify {image}: {e}")];
            return (d, false, None);
        }
    };
    let pinned = image.with_digest(&digest);
    let key = CacheKey {
        image: pinned.to_string(),
        enforced: true,
        fingerprint: snapshot.fingerprint().to_string(),
        object: object_cache_key(&snapshot, image, context.object),
    };
    let (mut decision, hit) = proxy
        .cache
        .get_or_compute(key, || {
            decide_in(&snapshot, &proxy.registry, &pinned, context)
        })
        .await;
    // A cached decision may have been made for a pod of another enforced namespace.
    decision.namespace = namespace.map(str::to_string);
    (decision, hit, Some((image.clone(), pinned)))
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
