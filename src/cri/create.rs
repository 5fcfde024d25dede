//! `CreateContainer`: the create-time gate. Pull-time checks alone cannot keep the node's
//! guarantee: `IfNotPresent`/`Never` pods, preloaded images, images pulled in other namespaces
//! and image-ID references never call `PullImage`. Every container is created here, so here
//! the image's content, as containerd holds it, is decided for the sandbox's namespace.
//!
//! kubelet sends the image ID (`sha256:<config digest>`) it resolved and, since Kubernetes
//! 1.30, the name the pod asked for (`user_specified_image`). pullgate asks containerd which
//! manifest digests it holds that content under (`repo@digest` records, and the targets of
//! its tag records) and decides those digests with the engine:
//!
//! - when the pod's name parses, that name is decided (with its tag only where containerd's
//!   record of that tag points at this content), and the content is admitted when one of its
//!   digests is admitted for it — all of them denote the same content;
//! - when it does not (an image-ID reference, an older kubelet), every repository the node
//!   knows the content by is decided, and all must admit.
//!
//! An allow verdict cached for that digest and policy context (a verified pull a moment ago)
//! is reused; otherwise signatures are fetched, with the credential kubelet last pulled that
//! repository with (never sent to another host). A refusal never reaches containerd, so a
//! refused container never exists.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use bytes::Bytes;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::GetImageRequest;
use containerd_client::with_namespace;
use futures_util::future::join_all;
use prost::Message as _;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use tracing::Instrument as _;

use super::api::{
    CreateContainerRequest, Image, ImageSpec, ImageStatusRequest, ImageStatusResponse,
};
use super::pull::containerd_name;
use super::{refusal, sandbox_object, Gate, Proxy, CREATE_CONTAINER_PATH, K8S_NAMESPACE};
use crate::audit::Source;
use crate::engine::Engine;
use crate::engine::{Outcome, Request as EngineRequest};
use crate::image_ref::{is_digest, ImageRef};
use crate::policy::eval::{Decision, Verdict};
use crate::registry::Credential;

/// containerd's own CRI image lookup, asked through the raw channel.
const IMAGE_STATUS_PATH: &str = "/runtime.v1.ImageService/ImageStatus";

/// Most repositories whose last pull credential is remembered.
const MAX_REMEMBERED: usize = 4096;

/// The credential kubelet last pulled each repository with (`registry/repository`), kept in
/// memory only, so that a container re-created after its verdict expired can still have its
/// signatures fetched from a private registry. Used only for that same repository's host.
#[derive(Default)]
pub struct PullCredentials {
    by_repository: Mutex<HashMap<String, Credential>>,
}

impl PullCredentials {
    pub fn remember(&self, image: &ImageRef, credential: Option<&Credential>) {
        let mut map = self.by_repository.lock().unwrap_or_else(|p| p.into_inner());
        match credential {
            Some(c) => {
                if map.len() >= MAX_REMEMBERED && !map.contains_key(&image.name()) {
                    map.clear();
                }
                map.insert(image.name(), c.clone());
            }
            None => {
                map.remove(&image.name());
            }
        }
    }

    fn get(&self, image: &ImageRef) -> Option<Credential> {
        let map = self.by_repository.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&image.name()).cloned()
    }
}

/// What containerd holds for one image ID.
#[derive(Debug, Default)]
struct OnNode {
    /// `(repository, manifest digest)` pairs, from `repo@digest` records and tag targets.
    digests: Vec<(ImageRef, String)>,
    /// Tag records (`registry/repository:tag`) of this content.
    tags: Vec<ImageRef>,
}

impl OnNode {
    fn all_digests(&self) -> Vec<String> {
        let mut all: Vec<String> = self.digests.iter().map(|(_, d)| d.clone()).collect();
        all.sort();
        all.dedup();
        all
    }

    /// Each repository the content is known by, without tag or digest.
    fn repositories(&self) -> Vec<ImageRef> {
        let mut names: Vec<ImageRef> = Vec::new();
        for r in self.digests.iter().map(|(r, _)| r).chain(&self.tags) {
            let bare = r.without_tag_or_digest();
            if !names.iter().any(|n| n.name() == bare.name()) {
                names.push(bare);
            }
        }
        names
    }
}

pub async fn create_container(
    proxy: &Proxy,
    req: Request<Bytes>,
) -> Result<Response<Bytes>, Status> {
    let msg = CreateContainerRequest::decode(req.get_ref().clone())
        .map_err(|e| Status::invalid_argument(format!("malformed CreateContainerRequest: {e}")))?;
    let sandbox = msg.sandbox_config.as_ref();
    let metadata = sandbox.and_then(|c| c.metadata.as_ref());
    let namespace = metadata
        .map(|m| m.namespace.as_str())
        .filter(|s| !s.is_empty());
    // Exempt namespaces are forwarded without a decision (static control-plane pods must
    // never depend on pullgate's verdicts).
    let engine = match proxy.gate(namespace)? {
        Gate::Decide(engine) => engine,
        Gate::Forward => return proxy.forward(CREATE_CONTAINER_PATH, req).await,
    };
    if namespace.is_some_and(|ns| engine.policies.current().is_exempt(ns)) {
        return proxy.forward(CREATE_CONTAINER_PATH, req).await;
    }
    let pod = metadata.map(|m| m.name.as_str()).filter(|s| !s.is_empty());
    let spec = msg
        .config
        .as_ref()
        .and_then(|c| c.image.clone())
        .unwrap_or_default();
    let object = sandbox.map(sandbox_object);
    let span = tracing::info_span!("create", image = %spec.image, user_image = %spec.user_specified_image, namespace, pod);

    async {
        let started = Instant::now();
        let asked = ImageRef::parse(&spec.user_specified_image).ok();
        let outcome = match image_on_node(proxy, &spec.image, asked.as_ref()).await {
            Ok(Some(held)) => {
                decide(
                    proxy,
                    engine,
                    started,
                    &held,
                    &spec,
                    namespace,
                    pod,
                    object.as_ref(),
                )
                .await
            }
            Ok(None) => refuse_without_lookup(
                engine,
                started,
                &spec,
                namespace,
                pod,
                format!("image {} is not on this node", shown(&spec)),
            ),
            Err(e) => refuse_without_lookup(
                engine,
                started,
                &spec,
                namespace,
                pod,
                format!(
                    "could not verify {}: cannot read the image from containerd: {}",
                    shown(&spec),
                    e.message()
                ),
            ),
        };
        if !outcome.decision.verdict.admits() {
            return Err(refusal(&outcome.decision, "container creation refused"));
        }
        proxy.forward(CREATE_CONTAINER_PATH, req).await
    }
    .instrument(span)
    .await
}

/// The name to show for the image: the pod's, else the ID kubelet sent.
fn shown(spec: &ImageSpec) -> &str {
    if spec.user_specified_image.is_empty() {
        &spec.image
    } else {
        &spec.user_specified_image
    }
}

/// A refusal decided before any policy could be asked (the content is not found): audited as
/// every decision is, through the engine's audit log.
fn refuse_without_lookup(
    engine: &Engine,
    started: Instant,
    spec: &ImageSpec,
    namespace: Option<&str>,
    pod: Option<&str>,
    reason: String,
) -> Outcome {
    let snapshot = engine.policies.current();
    let enforced = snapshot.is_enforced(namespace);
    let decision = Decision {
        image: shown(spec).to_string(),
        digest: None,
        namespace: namespace.map(str::to_string),
        enforced,
        verdict: if enforced {
            Verdict::Error
        } else {
            Verdict::Allow
        },
        reasons: vec![reason],
        policies: Vec::new(),
    };
    let outcome = Outcome {
        decision,
        cache_hit: false,
        image: None,
        pinned: None,
    };
    let request = EngineRequest {
        pod,
        ..EngineRequest::new(Source::CriCreate, namespace)
    };
    engine.record(&request, &outcome, started);
    outcome
}

#[allow(clippy::too_many_arguments)]
async fn decide(
    proxy: &Proxy,
    engine: &Engine,
    started: Instant,
    held: &OnNode,
    spec: &ImageSpec,
    namespace: Option<&str>,
    pod: Option<&str>,
    object: Option<&crate::policy::object::AdmissionObject>,
) -> Outcome {
    let all = held.all_digests();
    let decide_name = |name: ImageRef, digests: Vec<String>| {
        let credential = proxy.pull_credentials.get(&name);
        async move {
            let request = EngineRequest {
                pod,
                auth: credential.as_ref(),
                object,
                ..EngineRequest::new(Source::CriCreate, namespace)
            };
            engine.decide_on_node(&name, &digests, &request).await
        }
    };
    match ImageRef::parse(&spec.user_specified_image) {
        Ok(asked) => {
            let (name, digests) = match asked.digest() {
                // The pod named a digest: it must be one the node holds this content under.
                Some(d) => (
                    asked.without_tag(),
                    all.iter().filter(|x| *x == d).cloned().collect(),
                ),
                None => {
                    // The tag counts for coverage only where the node's record of it is this
                    // content.
                    let recorded = held
                        .tags
                        .iter()
                        .any(|t| t.name() == asked.name() && t.tag() == asked.tag());
                    let name = match recorded {
                        true => asked.clone(),
                        false => asked.without_tag_or_digest(),
                    };
                    (name, all.clone())
                }
            };
            decide_name(name, digests).await
        }
        Err(_) => {
            // An image-ID reference (or no name at all): every name the node knows the
            // content by must admit it.
            let names = held.repositories();
            let mut last = None;
            for name in names {
                let outcome = decide_name(name, all.clone()).await;
                if !outcome.decision.verdict.admits() {
                    return outcome;
                }
                last = Some(outcome);
            }
            match last {
                Some(outcome) => outcome,
                None => refuse_without_lookup(
                    engine,
                    started,
                    spec,
                    namespace,
                    pod,
                    format!(
                        "image {} is known on this node by no repository name, so no policy can be \
                         applied to it: pull it by name",
                        shown(spec)
                    ),
                ),
            }
        }
    }
}

/// containerd's CRI answer for `image` (an image ID or a reference), `None` when it holds
/// nothing by that name.
async fn image_status(proxy: &Proxy, image: &str) -> Result<Option<Image>, Status> {
    let request = ImageStatusRequest {
        image: Some(ImageSpec {
            image: image.to_string(),
            ..ImageSpec::default()
        }),
        verbose: false,
    };
    let answer = proxy
        .forward(
            IMAGE_STATUS_PATH,
            Request::new(Bytes::from(request.encode_to_vec())),
        )
        .await?;
    let status = ImageStatusResponse::decode(answer.into_inner()).map_err(|e| {
        Status::internal(format!(
            "containerd's ImageStatus answer does not decode: {e}"
        ))
    })?;
    Ok(status.image)
}

/// What containerd holds for the image kubelet names (an image ID, or a reference); `None`
/// when it holds nothing by that name. `asked`: the pod's reference, whose tag record is
/// looked up as well (the CRI plugin learns of a tag record a moment after it is written).
///
/// A tag record counts only where it points at this very content: its target digest is one of
/// the content's `repo@digest` records, or containerd resolves `repo@target` to this image ID.
/// The CRI plugin's list of tags may lag a moved tag, and a digest that is not this content
/// must never stand in for it.
async fn image_on_node(
    proxy: &Proxy,
    image: &str,
    asked: Option<&ImageRef>,
) -> Result<Option<OnNode>, Status> {
    let asked = asked.filter(|a| a.tag().is_some() && a.digest().is_none());
    let images = ImagesClient::new(proxy.containerd.clone());
    // The pod's own tag record is read while containerd looks the content up: a cached create
    // then waits for one containerd round trip, not two.
    let (found, asked_target) = tokio::join!(image_status(proxy, image), async {
        match asked {
            Some(tagged) => tag_target(images.clone(), tagged).await,
            None => None,
        }
    });
    let Some(found) = found? else {
        return Ok(None);
    };
    let mut held = OnNode::default();
    for reference in &found.repo_digests {
        if let Ok(r) = ImageRef::parse(reference) {
            if let Some(d) = r.digest().filter(|d| is_digest(d)) {
                held.digests.push((r.without_tag(), d.to_string()));
            }
        }
    }
    let others: Vec<ImageRef> = found
        .repo_tags
        .iter()
        .filter_map(|t| ImageRef::parse(t).ok())
        .filter(|t| t.tag().is_some() && Some(t) != asked)
        .collect();
    let other_targets = join_all(others.iter().map(|t| tag_target(images.clone(), t))).await;
    let records = asked
        .map(|a| (a, asked_target))
        .into_iter()
        .chain(others.iter().zip(other_targets));
    for (tagged, target) in records {
        let Some(target) = target else {
            continue;
        };
        let known = held.digests.iter().any(|(_, d)| *d == target);
        let same_content = known
            || image_status(proxy, &format!("{}@{}", containerd_name(tagged), target))
                .await
                .ok()
                .flatten()
                .is_some_and(|i| i.id == found.id);
        if same_content {
            held.digests.push((tagged.without_tag_or_digest(), target));
            held.tags.push(tagged.clone());
        }
    }
    Ok(Some(held))
}

/// The manifest digest containerd's record of `tagged` points at, if it has such a record.
async fn tag_target(mut images: ImagesClient<Channel>, tagged: &ImageRef) -> Option<String> {
    let name = format!(
        "{}:{}",
        containerd_name(tagged),
        tagged.tag().unwrap_or("latest")
    );
    let record = images
        .get(with_namespace!(GetImageRequest { name }, K8S_NAMESPACE))
        .await
        .ok()?;
    let target = record.into_inner().image?.target?;
    is_digest(&target.digest).then_some(target.digest)
}
