//! Loading the objects a user would `kubectl apply` from YAML/JSON files or directories of
//! them: ClusterImagePolicies, TrustRoots, Namespaces, key Secrets and the
//! `config-policy-controller` ConfigMap.

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::types::{ClusterImagePolicy, TrustRoot, GROUP};

/// Largest policy file read; a policy set is text, never megabytes of it.
pub const MAX_FILE_BYTES: u64 = 4 << 20;
/// Most files read from one directory.
pub const MAX_FILES: usize = 10_000;

/// An object and where it came from (`file` or `file#doc` for multi-document files).
#[derive(Debug, Clone)]
pub struct Sourced<T> {
    pub origin: String,
    pub object: T,
}

/// Everything a policy directory (or the API server) supplies to build a snapshot.
#[derive(Debug, Clone, Default)]
pub struct Objects {
    pub cips: Vec<Sourced<ClusterImagePolicy>>,
    pub trust_roots: Vec<Sourced<TrustRoot>>,
    pub namespaces: Vec<Namespace>,
    pub secrets: Vec<Secret>,
    pub config_maps: Vec<ConfigMap>,
    /// Verified trust of `remote` (TUF) TrustRoots, fetched before a build (never from files).
    pub tuf_remote: super::tuf_source::RemoteTrust,
}

/// A file or document that could not be read; `origin` names file and document.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{origin}: {message}")]
pub struct LoadError {
    pub origin: String,
    pub message: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TypeMeta {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
}

impl Objects {
    /// Loads files and directories (non-recursive; `*.yaml`, `*.yml`, `*.json`; dot files are
    /// skipped, so Kubernetes ConfigMap volume internals are ignored). Every problem is
    /// collected; an error means the set must not be used.
    pub fn load_paths(paths: &[PathBuf]) -> Result<Objects, Vec<LoadError>> {
        let mut objects = Objects::default();
        let mut errors = Vec::new();
        for path in paths {
            match policy_files(path) {
                Ok(files) => {
                    for file in files {
                        if let Err(mut e) = objects.load_file(&file) {
                            errors.append(&mut e);
                        }
                    }
                }
                Err(e) => errors.push(e),
            }
        }
        if errors.is_empty() {
            Ok(objects)
        } else {
            Err(errors)
        }
    }

    fn load_file(&mut self, file: &Path) -> Result<(), Vec<LoadError>> {
        let origin = file.display().to_string();
        let err = |message: String| {
            vec![LoadError {
                origin: origin.clone(),
                message,
            }]
        };
        let meta = std::fs::metadata(file).map_err(|e| err(e.to_string()))?;
        if meta.len() > MAX_FILE_BYTES {
            return Err(err(format!(
                "file is {} bytes; the limit is {MAX_FILE_BYTES}",
                meta.len()
            )));
        }
        let text = std::fs::read_to_string(file).map_err(|e| err(e.to_string()))?;
        self.load_str(&text, &origin)
    }

    /// Parses multi-document YAML (JSON is YAML too) and adds its objects.
    pub fn load_str(&mut self, text: &str, origin: &str) -> Result<(), Vec<LoadError>> {
        let mut errors = Vec::new();
        for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let doc_origin = format!("{origin} (document {})", i + 1);
            let value = match serde_yaml::Value::deserialize(doc) {
                Ok(v) => v,
                Err(e) => {
                    // A YAML syntax error ends the stream: nothing after it can be trusted.
                    errors.push(LoadError {
                        origin: doc_origin,
                        message: format!("invalid YAML: {e}"),
                    });
                    break;
                }
            };
            if let Err(e) = self.add_value(value, &doc_origin) {
                errors.push(e);
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    fn add_value(&mut self, value: serde_yaml::Value, origin: &str) -> Result<(), LoadError> {
        let err = |message: String| LoadError {
            origin: origin.to_string(),
            message,
        };
        if value.is_null() {
            return Ok(());
        }
        let meta: TypeMeta = serde_yaml::from_value(value.clone())
            .map_err(|e| err(format!("not a Kubernetes object: {e}")))?;
        let group = meta.api_version.split('/').next().unwrap_or_default();
        match (group, meta.kind.as_str()) {
            (GROUP, "ClusterImagePolicy") => {
                check_version(&meta.api_version, &["v1alpha1", "v1beta1"]).map_err(err)?;
                let object = typed(value).map_err(err)?;
                self.cips.push(Sourced {
                    origin: origin.to_string(),
                    object,
                });
            }
            (GROUP, "TrustRoot") => {
                check_version(&meta.api_version, &["v1alpha1"]).map_err(err)?;
                let object = typed(value).map_err(err)?;
                self.trust_roots.push(Sourced {
                    origin: origin.to_string(),
                    object,
                });
            }
            ("v1", "Namespace") => self.namespaces.push(typed(value).map_err(err)?),
            ("v1", "Secret") => self.secrets.push(typed(value).map_err(err)?),
            ("v1", "ConfigMap") => self.config_maps.push(typed(value).map_err(err)?),
            ("v1", "List") => {
                let items = value
                    .get("items")
                    .and_then(|i| i.as_sequence())
                    .cloned()
                    .unwrap_or_default();
                for (i, item) in items.into_iter().enumerate() {
                    self.add_value(item, &format!("{origin} items[{i}]"))?;
                }
            }
            _ => {
                return Err(err(format!(
                    "unsupported object apiVersion={:?} kind={:?}: expected ClusterImagePolicy, \
                     TrustRoot ({GROUP}), Namespace, Secret or ConfigMap (v1)",
                    meta.api_version, meta.kind
                )))
            }
        }
        Ok(())
    }
}

pub(crate) fn check_version(api_version: &str, versions: &[&str]) -> Result<(), String> {
    let version = api_version
        .split_once('/')
        .map(|(_, v)| v)
        .unwrap_or_default();
    if versions.contains(&version) {
        Ok(())
    } else {
        Err(format!(
            "unsupported apiVersion {api_version:?}: expected {}",
            versions
                .iter()
                .map(|v| format!("{GROUP}/{v}"))
                .collect::<Vec<_>>()
                .join(" or ")
        ))
    }
}

/// Deserializes with the failing field's path in the message.
fn typed<T: DeserializeOwned>(value: serde_yaml::Value) -> Result<T, String> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            e.inner().to_string()
        } else {
            format!("{path}: {}", e.inner())
        }
    })
}

/// Policy files of `path`: the file itself, or the sorted `*.yaml|*.yml|*.json` of a directory.
pub fn policy_files(path: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let err = |message: String| LoadError {
        origin: path.display().to_string(),
        message,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).map_err(|e| err(e.to_string()))? {
        let entry = entry.map_err(|e| err(e.to_string()))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let wanted = !name.starts_with('.')
            && [".yaml", ".yml", ".json"]
                .iter()
                .any(|ext| name.ends_with(ext));
        if wanted && entry.path().is_file() {
            files.push(entry.path());
            if files.len() > MAX_FILES {
                return Err(err(format!("more than {MAX_FILES} policy files")));
            }
        }
    }
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_multi_document_yaml_of_mixed_kinds() {
        let text = r#"
apiVersion: policy.sigstore.dev/v1beta1
kind: ClusterImagePolicy
metadata: {name: a}
spec:
  images: [{glob: "ghcr.io/**"}]
  authorities: [{static: {action: pass}}]
---
apiVersion: v1
kind: Namespace
metadata: {name: prod, labels: {policy.sigstore.dev/include: "true"}}
---
---
apiVersion: v1
kind: Secret
metadata: {name: k, namespace: cosign-system}
stringData: {cosign.pub: "x"}
"#;
        let mut objects = Objects::default();
        objects.load_str(text, "t.yaml").unwrap();
        assert_eq!(objects.cips.len(), 1);
        assert_eq!(objects.namespaces.len(), 1);
        assert_eq!(objects.secrets.len(), 1);
        assert_eq!(objects.cips[0].origin, "t.yaml (document 1)");
    }

    #[test]
    fn unknown_fields_are_errors_with_their_path() {
        let text = r#"
apiVersion: policy.sigstore.dev/v1alpha1
kind: ClusterImagePolicy
metadata: {name: a}
spec:
  images: [{glob: "x"}]
  authorities:
  - key: {data: "x", hashAlgoritm: sha256}
"#;
        let errors = Objects::default().load_str(text, "t.yaml").unwrap_err();
        assert_eq!(errors.len(), 1);
        let msg = errors[0].to_string();
        assert!(msg.contains("spec.authorities[0].key"), "{msg}");
        assert!(msg.contains("unknown field `hashAlgoritm`"), "{msg}");
    }

    #[test]
    fn wrong_kinds_versions_and_syntax() {
        let mut o = Objects::default();
        let e = o
            .load_str("apiVersion: apps/v1\nkind: Deployment\n", "d")
            .unwrap_err();
        assert!(e[0].message.contains("unsupported object"), "{e:?}");
        let e = o
            .load_str(
                "apiVersion: policy.sigstore.dev/v2\nkind: ClusterImagePolicy\nspec: {}\n",
                "v",
            )
            .unwrap_err();
        assert!(e[0].message.contains("unsupported apiVersion"), "{e:?}");
        let e = o.load_str("a: [\n", "y").unwrap_err();
        assert!(e[0].message.starts_with("invalid YAML"), "{e:?}");
        let e = o.load_str("- 1\n- 2\n", "s").unwrap_err();
        assert!(e[0].message.contains("not a Kubernetes object"), "{e:?}");
    }
}
