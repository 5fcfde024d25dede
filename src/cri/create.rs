//! `CreateContainer`: the create-time gate. kubelet creates containers from images that never
//! went through `PullImage` (`IfNotPresent`/`Never`, preloaded images, images pulled for another
//! namespace), so this is where the node's guarantee is enforced.

use bytes::Bytes;
use tonic::{Request, Response, Status};

use super::{Proxy, CREATE_CONTAINER_PATH};

/// Decides whether the container's image (its ID and `user_specified_image`, in the sandbox's
/// namespace) may start, then forwards the request unchanged or refuses it with the
/// `SignatureValidationFailed` prefix. The create-time gate decision is added here; until then
/// the request is forwarded to containerd as it came.
pub async fn create_container(
    proxy: &Proxy,
    req: Request<Bytes>,
) -> Result<Response<Bytes>, Status> {
    proxy.forward(CREATE_CONTAINER_PATH, req).await
}
