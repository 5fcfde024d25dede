//! A workload's `imagePullSecrets`, read from its namespace at review time, so the shim can
//! resolve and fetch signatures of private images as kubelet would pull them.
//!
//! Only in cluster mode (the Secrets live in the API server). A Secret that is missing, of
//! another type or malformed is skipped with a warning, as kubelet skips it: credentials only
//! open registry access; they never make an image pass.

use std::time::Duration;

use ::kube::api::Api;
use k8s_openapi::api::core::v1::Secret;

use crate::registry::Credentials;

/// At most this many pull secrets are read per review (a pod lists a handful).
const MAX_SECRETS: usize = 16;
/// Time allowed for one Secret GET.
const GET_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads pull secrets through the API server.
pub struct PullSecrets {
    client: ::kube::Client,
}

impl PullSecrets {
    pub fn new(client: ::kube::Client) -> PullSecrets {
        PullSecrets { client }
    }

    /// The registry credentials of the named Secrets in `namespace`, first Secret first.
    pub async fn credentials(&self, namespace: &str, names: &[String]) -> Credentials {
        let api = Api::<Secret>::namespaced(self.client.clone(), namespace);
        let mut creds = Credentials::default();
        for name in names.iter().take(MAX_SECRETS) {
            let secret = match tokio::time::timeout(GET_TIMEOUT, api.get(name)).await {
                Ok(Ok(secret)) => secret,
                Ok(Err(e)) => {
                    tracing::warn!(namespace, name, error = %e, "imagePullSecret not readable; skipped");
                    continue;
                }
                Err(_) => {
                    tracing::warn!(namespace, name, "imagePullSecret read timed out; skipped");
                    continue;
                }
            };
            match secret_credentials(&secret) {
                Ok(Some(found)) => creds.merge(found),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(namespace, name, error = %e, "imagePullSecret malformed; skipped")
                }
            }
        }
        creds
    }
}

/// Credentials of a `kubernetes.io/dockerconfigjson` or `kubernetes.io/dockercfg` Secret;
/// `None` for any other type.
pub fn secret_credentials(secret: &Secret) -> Result<Option<Credentials>, String> {
    let entry = |key: &str| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|b| b.0.as_slice())
            .ok_or_else(|| format!("no {key} entry"))
    };
    match secret.type_.as_deref() {
        Some("kubernetes.io/dockerconfigjson") => {
            Credentials::from_docker_config_json(entry(".dockerconfigjson")?).map(Some)
        }
        Some("kubernetes.io/dockercfg") => {
            Credentials::from_dockercfg_json(entry(".dockercfg")?).map(Some)
        }
        _ => Ok(None),
    }
}

impl crate::engine::PullSecretReader for PullSecrets {
    fn credentials<'a>(
        &'a self,
        namespace: &'a str,
        names: &'a [String],
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Credentials> + Send + 'a>> {
        Box::pin(PullSecrets::credentials(self, namespace, names))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    fn secret(type_: &str, key: &str, text: &str) -> Secret {
        Secret {
            type_: Some(type_.into()),
            data: Some([(key.to_string(), ByteString(text.as_bytes().to_vec()))].into()),
            ..Secret::default()
        }
    }

    #[test]
    fn both_secret_formats_and_other_types() {
        // "u:p" in base64.
        let json = secret(
            "kubernetes.io/dockerconfigjson",
            ".dockerconfigjson",
            r#"{"auths":{"reg.example:5000":{"auth":"dTpw"}}}"#,
        );
        let creds = secret_credentials(&json).unwrap().unwrap();
        assert!(creds.for_host("reg.example:5000").is_some());
        let cfg = secret(
            "kubernetes.io/dockercfg",
            ".dockercfg",
            r#"{"https://index.docker.io/v1/":{"auth":"dTpw"}}"#,
        );
        let creds = secret_credentials(&cfg).unwrap().unwrap();
        assert!(creds.for_host("index.docker.io").is_some());
        let opaque = secret("Opaque", "x", "{}");
        assert!(secret_credentials(&opaque).unwrap().is_none());
        let broken = secret("kubernetes.io/dockerconfigjson", ".dockerconfigjson", "{");
        assert!(secret_credentials(&broken).is_err());
        let missing = secret("kubernetes.io/dockerconfigjson", "other", "{}");
        assert_eq!(
            secret_credentials(&missing).unwrap_err(),
            "no .dockerconfigjson entry"
        );
    }
}
