//! Container image references, parsed and normalized the way containerd resolves them.
//!
//! The first path component names a registry only when it contains `.` or `:` or is
//! `localhost`; anything else is a Docker Hub repository (`index.docker.io`, with `library/`
//! for official images). That rule decides where the node really pulls from, so policies are
//! matched against exactly that name.

use std::sync::LazyLock;

use regex::Regex;

/// Longest reference accepted; checked before any parsing work.
pub const MAX_REFERENCE_LEN: usize = 4096;
/// Longest repository name (registry included), as in the distribution reference grammar.
const MAX_NAME_LEN: usize = 255;
/// Docker Hub's canonical name in policies.
pub const DOCKER_HUB: &str = "index.docker.io";
/// Docker Hub's API endpoint.
const DOCKER_HUB_API: &str = "registry-1.docker.io";

static COMPONENT: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*$").unwrap_or_else(|_| unreachable!())
});
static TAG: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$").unwrap_or_else(|_| unreachable!())
});
static HOST: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$")
        .unwrap_or_else(|_| unreachable!())
});

/// Why a string is not an image reference.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("invalid image reference {input:?}: {reason}")]
pub struct RefError {
    pub input: String,
    pub reason: String,
}

/// A parsed, normalized image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageRef {
    registry: String,
    repository: String,
    /// Explicit tag, or `latest` when the reference had neither tag nor digest.
    tag: Option<String>,
    digest: Option<String>,
}

impl ImageRef {
    pub fn parse(input: &str) -> Result<ImageRef, RefError> {
        let fail = |reason: &str| RefError {
            input: truncate(input),
            reason: reason.to_string(),
        };
        if input.len() > MAX_REFERENCE_LEN {
            return Err(fail(&format!("longer than {MAX_REFERENCE_LEN} bytes")));
        }
        if input.is_empty() {
            return Err(fail("empty"));
        }
        if input.chars().any(char::is_whitespace) {
            return Err(fail("contains whitespace"));
        }
        if input.contains("://") {
            return Err(fail("a reference has no URL scheme"));
        }
        let (rest, digest) = match input.split_once('@') {
            Some((rest, digest)) => {
                validate_digest(digest).map_err(|r| fail(&r))?;
                (rest, Some(digest.to_string()))
            }
            None => (input, None),
        };
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => {
                let tag = &rest[last_slash + i + 1..];
                if !TAG.is_match(tag) {
                    return Err(fail(&format!("invalid tag {tag:?}")));
                }
                (&rest[..last_slash + i], Some(tag.to_string()))
            }
            None => (rest, None),
        };
        if name.is_empty() {
            return Err(fail("missing repository name"));
        }
        if name.len() > MAX_NAME_LEN {
            return Err(fail(&format!(
                "repository name longer than {MAX_NAME_LEN} bytes"
            )));
        }
        let (registry, path) = match name.split_once('/') {
            Some((first, path))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                if !HOST.is_match(first) {
                    return Err(fail(&format!("invalid registry host {first:?}")));
                }
                (first.to_ascii_lowercase(), path)
            }
            _ => (DOCKER_HUB.to_string(), name),
        };
        if path.is_empty() {
            return Err(fail("missing repository name"));
        }
        for component in path.split('/') {
            if component.is_empty() {
                return Err(fail("empty path component"));
            }
            if !COMPONENT.is_match(component) {
                let reason = if COMPONENT.is_match(&component.to_ascii_lowercase()) {
                    "repository name must be lowercase".to_string()
                } else {
                    format!("invalid repository path component {component:?}")
                };
                return Err(fail(&reason));
            }
        }
        let registry = match registry.as_str() {
            "docker.io" | "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB.to_string(),
            _ => registry,
        };
        let repository = if registry == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path.to_string()
        };
        let tag = match (tag, &digest) {
            (None, None) => Some("latest".to_string()),
            (tag, _) => tag,
        };
        Ok(ImageRef {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// `index.docker.io` for Docker Hub, else `host[:port]` (host lowercased).
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// Repository path, `library/nginx` for an official Docker Hub image.
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// The tag: explicit, or `latest` when neither tag nor digest was given.
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    pub fn digest(&self) -> Option<&str> {
        self.digest.as_deref()
    }

    /// `registry/repository`.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// `registry/repository:tag`, when there is a tag.
    pub fn tag_form(&self) -> Option<String> {
        self.tag.as_ref().map(|t| format!("{}:{t}", self.name()))
    }

    /// `registry/repository@digest`, when there is a digest.
    pub fn digest_form(&self) -> Option<String> {
        self.digest.as_ref().map(|d| format!("{}@{d}", self.name()))
    }

    /// The same name and tag, pinned to `digest`.
    pub fn with_digest(&self, digest: &str) -> ImageRef {
        ImageRef {
            digest: Some(digest.to_string()),
            ..self.clone()
        }
    }

    /// The host to speak the registry API to.
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }

    /// Whether the registry is on this machine (`localhost`, `127.0.0.0/8`, `[::1]`): such
    /// registries are spoken to over plain HTTP, as containerd does.
    pub fn is_loopback(&self) -> bool {
        let host = match self.registry.rsplit_once(':') {
            Some((host, port)) if !port.contains(']') => host,
            _ => self.registry.as_str(),
        };
        host == "localhost"
            || host == "[::1]"
            || host
                .parse::<std::net::Ipv4Addr>()
                .is_ok_and(|ip| ip.is_loopback())
    }
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for ImageRef {
    type Err = RefError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ImageRef::parse(s)
    }
}

fn validate_digest(digest: &str) -> Result<(), String> {
    let (alg, hex) = digest
        .split_once(':')
        .ok_or_else(|| format!("invalid digest {digest:?}: expected algorithm:hex"))?;
    let want = match alg {
        "sha256" => 64,
        "sha512" => 128,
        _ => return Err(format!("unsupported digest algorithm {alg:?}")),
    };
    if hex.len() != want || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(format!(
            "invalid digest {digest:?}: {alg} needs {want} lowercase hex digits"
        ));
    }
    Ok(())
}

/// Keeps error messages bounded when the input is huge.
fn truncate(input: &str) -> String {
    if input.len() <= 200 {
        return input.to_string();
    }
    let mut end = 200;
    while !input.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &input[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_hub_forms_normalize_alike() {
        for s in [
            "nginx",
            "library/nginx",
            "docker.io/nginx",
            "index.docker.io/library/nginx:latest",
        ] {
            let r = ImageRef::parse(s).unwrap();
            assert_eq!(r.to_string(), "index.docker.io/library/nginx:latest", "{s}");
        }
    }

    #[test]
    fn loopback_detection() {
        for (s, lo) in [
            ("127.0.0.1:5000/a", true),
            ("localhost/a", true),
            ("localhost:5000/a", true),
            ("[::1]:5000/a", true),
            ("127.1.2.3/a", true),
            ("ghcr.io/a", false),
            ("10.0.0.1:5000/a", false),
        ] {
            assert_eq!(ImageRef::parse(s).unwrap().is_loopback(), lo, "{s}");
        }
    }

    #[test]
    fn huge_input_is_rejected_cheaply() {
        let huge = "a".repeat(MAX_REFERENCE_LEN + 1);
        let err = ImageRef::parse(&huge).unwrap_err();
        assert!(err.reason.contains("longer than"));
        assert!(err.to_string().len() < 400);
    }
}
