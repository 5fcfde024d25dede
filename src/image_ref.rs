//! Container image references, parsed and normalized the way containerd resolves them.
//!
//! The first path component names a registry only when it contains `.` or `:` or is exactly
//! `localhost`; anything else is a Docker Hub repository (`index.docker.io`, with `library/`
//! prepended to single-component names). That rule decides where the node really pulls from,
//! so policies are matched against exactly that name.
//!
//! Grammar (docker/distribution `reference`):
//!
//! ```text
//! reference  := name [ ":" tag ] [ "@" digest ]
//! name       := [ host [ ":" port ] "/" ] component ( "/" component )*
//! host       := dns-name | ipv4 | "[" ipv6 "]"
//! component  := [a-z0-9]+ ( ( "." | "_" | "__" | "-"+ ) [a-z0-9]+ )*
//! tag        := [A-Za-z0-9_] [A-Za-z0-9_.-]{0,127}
//! digest     := "sha256:" 64 lowercase hex | "sha512:" 128 lowercase hex
//! ```
//!
//! Parsing is hand-written (no regular expressions) and linear in the input, which is refused
//! outright beyond [`MAX_REFERENCE_LEN`] bytes.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// Longest reference accepted; checked before any parsing work.
pub const MAX_REFERENCE_LEN: usize = 4096;
/// Longest repository name (registry included), as in the distribution reference grammar.
pub const MAX_NAME_LEN: usize = 255;
/// Longest tag.
pub const MAX_TAG_LEN: usize = 128;
/// Docker Hub's canonical name in policies (what `registry()` returns for Docker Hub).
pub const DOCKER_HUB: &str = "index.docker.io";
/// Docker Hub's registry API endpoint.
pub const DOCKER_HUB_API: &str = "registry-1.docker.io";
/// The spellings of Docker Hub that normalize to [`DOCKER_HUB`].
const DOCKER_HUB_ALIASES: [&str; 3] = ["docker.io", DOCKER_HUB, DOCKER_HUB_API];
/// Docker Hub's domain as containerd spells it; the name-length limit is measured with it.
const DOCKER_HUB_FAMILIAR: &str = "docker.io";
/// How much of an offending input an error message repeats.
const SHOWN_INPUT_LEN: usize = 256;

/// Why a string is not an image reference. Every message names the (possibly shortened) input.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RefError {
    #[error("invalid image reference \"\": empty string")]
    Empty,
    #[error(
        "invalid image reference ({len} bytes, starting {start:?}): longer than {MAX_REFERENCE_LEN} bytes"
    )]
    TooLong { len: usize, start: String },
    #[error("invalid image reference {input:?}: contains whitespace")]
    Whitespace { input: String },
    #[error(
        "invalid image reference {input:?}: a URL scheme ({scheme}://) is not part of an image reference; write host/repository[:tag][@digest]"
    )]
    Scheme { input: String, scheme: String },
    #[error("invalid image reference {input:?}: invalid character {ch:?}")]
    InvalidChar { input: String, ch: char },
    #[error(
        "invalid image reference {input:?}: an image ID (sha256:<64 hex>, or 64 hex characters) names content already on one node, not an image to verify; write host/repository@sha256:<manifest digest>"
    )]
    ImageId { input: String },
    #[error(
        "invalid image reference {input:?}: invalid tag {tag:?}: a tag is 1 to {MAX_TAG_LEN} of letters, digits, '_', '.' and '-', not starting with '.' or '-'"
    )]
    InvalidTag { input: String, tag: String },
    #[error("invalid image reference {input:?}: invalid digest {digest:?}: {reason}")]
    InvalidDigest {
        input: String,
        digest: String,
        reason: String,
    },
    #[error("invalid image reference {input:?}: invalid registry host {host:?}")]
    InvalidRegistry { input: String, host: String },
    #[error("invalid image reference {input:?}: missing repository name")]
    MissingRepository { input: String },
    #[error("invalid image reference {input:?}: repository name must be lowercase")]
    Uppercase { input: String },
    #[error("invalid image reference {input:?}: empty path component in the repository name")]
    EmptyComponent { input: String },
    #[error(
        "invalid image reference {input:?}: invalid repository path component {component:?}: components are lowercase letters and digits, separated by '.', '_', '__' or dashes"
    )]
    InvalidComponent { input: String, component: String },
    #[error(
        "invalid image reference {input:?}: repository name is {len} characters, longer than {MAX_NAME_LEN}"
    )]
    NameTooLong { input: String, len: usize },
}

/// A parsed, normalized image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageRef {
    /// `index.docker.io` for Docker Hub, else `host[:port]` with the host lowercased.
    registry: String,
    repository: String,
    /// Explicit tag, or `latest` when the reference had neither tag nor digest.
    tag: Option<String>,
    digest: Option<String>,
}

impl ImageRef {
    /// Parses and normalizes `s`. See the module documentation for the grammar.
    pub fn parse(s: &str) -> Result<ImageRef, RefError> {
        if s.len() > MAX_REFERENCE_LEN {
            return Err(RefError::TooLong {
                len: s.len(),
                start: shorten(s, 64),
            });
        }
        if s.is_empty() {
            return Err(RefError::Empty);
        }
        let input = || shorten(s, SHOWN_INPUT_LEN);
        if s.chars().any(char::is_whitespace) {
            return Err(RefError::Whitespace { input: input() });
        }
        if let Some(scheme) = url_scheme(s) {
            return Err(RefError::Scheme {
                input: input(),
                scheme: scheme.to_string(),
            });
        }
        if let Some(ch) = s.chars().find(|&c| !is_reference_char(c)) {
            return Err(RefError::InvalidChar { input: input(), ch });
        }
        // containerd resolves these as local image IDs, never as Docker Hub tags of a
        // repository named `sha256`: whatever they are read as, nothing would be verified.
        let id = s.strip_prefix("sha256:").unwrap_or(s);
        if id.len() == 64 && is_lower_hex(id) {
            return Err(RefError::ImageId { input: input() });
        }

        // name[:tag] @ digest
        let (rest, digest) = match s.split_once('@') {
            Some((rest, digest)) => {
                if let Err(reason) = check_digest(digest) {
                    return Err(RefError::InvalidDigest {
                        input: input(),
                        digest: shorten(digest, SHOWN_INPUT_LEN),
                        reason,
                    });
                }
                (rest, Some(digest))
            }
            None => (s, None),
        };
        if rest.is_empty() || names_registry_only(rest) {
            return Err(RefError::MissingRepository { input: input() });
        }

        // name : tag — the tag follows the first ':' of the last path component.
        let last_start = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_start..].find(':') {
            Some(i) => {
                let colon = last_start + i;
                let tag = &rest[colon + 1..];
                if !is_tag(tag) {
                    return Err(RefError::InvalidTag {
                        input: input(),
                        tag: shorten(tag, SHOWN_INPUT_LEN),
                    });
                }
                (&rest[..colon], Some(tag))
            }
            None => (rest, None),
        };
        if name.is_empty() {
            return Err(RefError::MissingRepository { input: input() });
        }

        // [registry /] path
        let (registry, path) = match name.split_once('/') {
            Some((first, path)) if looks_like_registry(first) => {
                let Some(host) = normalize_host(first) else {
                    return Err(RefError::InvalidRegistry {
                        input: input(),
                        host: first.to_string(),
                    });
                };
                (host, path)
            }
            _ => (DOCKER_HUB.to_string(), name),
        };
        let registry = if DOCKER_HUB_ALIASES.contains(&registry.as_str()) {
            DOCKER_HUB.to_string()
        } else {
            registry
        };
        if path.is_empty() || path.ends_with('/') {
            return Err(RefError::MissingRepository { input: input() });
        }
        if path.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(RefError::Uppercase { input: input() });
        }
        for component in path.split('/') {
            if component.is_empty() {
                return Err(RefError::EmptyComponent { input: input() });
            }
            if !is_path_component(component) {
                return Err(RefError::InvalidComponent {
                    input: input(),
                    component: component.to_string(),
                });
            }
        }

        let is_hub = registry == DOCKER_HUB;
        let repository = if is_hub && !path.contains('/') {
            format!("library/{path}")
        } else {
            path.to_string()
        };
        let domain_len = if is_hub {
            DOCKER_HUB_FAMILIAR.len()
        } else {
            registry.len()
        };
        let name_len = domain_len + 1 + repository.len();
        if name_len > MAX_NAME_LEN {
            return Err(RefError::NameTooLong {
                input: input(),
                len: name_len,
            });
        }

        let tag = match (tag, digest) {
            (None, None) => Some("latest".to_string()),
            (tag, _) => tag.map(str::to_string),
        };
        Ok(ImageRef {
            registry,
            repository,
            tag,
            digest: digest.map(str::to_string),
        })
    }

    /// `index.docker.io` for Docker Hub, else `host[:port]` as written, host lowercased.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// Repository path: `library/nginx` for an official Docker Hub image.
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// The explicit tag, or `latest` when neither tag nor digest was given; `None` for a
    /// digest-only reference.
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// `sha256:<64 hex>` or `sha512:<128 hex>`, when the reference carries a digest.
    pub fn digest(&self) -> Option<&str> {
        self.digest.as_deref()
    }

    /// `registry/repository`, e.g. `index.docker.io/library/nginx`.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// `registry/repository:tag`, when there is a tag.
    pub fn tag_form(&self) -> Option<String> {
        self.tag
            .as_ref()
            .map(|t| format!("{}/{}:{t}", self.registry, self.repository))
    }

    /// `registry/repository@digest`, when there is a digest.
    pub fn digest_form(&self) -> Option<String> {
        self.digest
            .as_ref()
            .map(|d| format!("{}/{}@{d}", self.registry, self.repository))
    }

    /// The same name and tag, pinned to `digest`. The digest is taken as given; check
    /// untrusted digests with [`is_digest`] first.
    pub fn with_digest(&self, digest: &str) -> ImageRef {
        ImageRef {
            digest: Some(digest.to_string()),
            ..self.clone()
        }
    }

    /// The same name and digest without the tag: what containerd fetches for a reference that
    /// carries both (it ignores the tag).
    pub fn without_tag(&self) -> ImageRef {
        ImageRef {
            tag: None,
            ..self.clone()
        }
    }

    /// The repository alone, without tag or digest: a name to pin to a digest with
    /// [`ImageRef::with_digest`] (it is not a reference on its own).
    pub fn without_tag_or_digest(&self) -> ImageRef {
        ImageRef {
            tag: None,
            digest: None,
            ..self.clone()
        }
    }

    /// Whether the image lives on Docker Hub.
    pub fn is_docker_hub(&self) -> bool {
        self.registry == DOCKER_HUB
    }

    /// The host to speak the registry API to: `registry-1.docker.io` for Docker Hub, else
    /// [`registry`](Self::registry).
    pub fn api_host(&self) -> &str {
        if self.is_docker_hub() {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }

    /// The registry host without its port (`[::1]` keeps its brackets).
    pub fn host(&self) -> &str {
        split_port(&self.registry).0
    }

    /// Whether the registry is on this machine: `localhost`, `127.0.0.0/8` or `[::1]`. Such
    /// registries are spoken to over plain HTTP, as containerd does.
    pub fn is_loopback(&self) -> bool {
        let host = self.host();
        if host == "localhost" {
            return true;
        }
        if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            return inner.parse::<Ipv6Addr>().is_ok_and(|ip| ip.is_loopback());
        }
        host.parse::<Ipv4Addr>().is_ok_and(|ip| ip.is_loopback())
    }
}

impl fmt::Display for ImageRef {
    /// `name[:tag][@digest]`; a reference written with both tag and digest keeps both.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
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

impl FromStr for ImageRef {
    type Err = RefError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ImageRef::parse(s)
    }
}

/// Whether `digest` is a digest this crate accepts: `sha256:` with 64 lowercase hex digits or
/// `sha512:` with 128.
pub fn is_digest(digest: &str) -> bool {
    check_digest(digest).is_ok()
}

fn check_digest(digest: &str) -> Result<(), String> {
    let Some((algorithm, hex)) = digest.split_once(':') else {
        return Err("expected algorithm:hex, e.g. sha256:<64 hex digits>".to_string());
    };
    let want = match algorithm {
        "sha256" => 64,
        "sha512" => 128,
        _ => {
            return Err(format!(
                "unsupported digest algorithm {:?} (sha256 or sha512)",
                shorten(algorithm, 32)
            ))
        }
    };
    if hex.len() != want || !is_lower_hex(hex) {
        return Err(format!(
            "{algorithm} needs exactly {want} lowercase hex digits"
        ));
    }
    Ok(())
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Characters that may appear anywhere in a reference (where exactly is checked later).
fn is_reference_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/' | ':' | '@' | '[' | ']')
}

/// The scheme of a URL-looking input (`https://ghcr.io/x` gives `https`).
fn url_scheme(s: &str) -> Option<&str> {
    let (scheme, _) = s.split_once("://")?;
    let mut bytes = scheme.bytes();
    let first = bytes.next()?;
    (first.is_ascii_alphabetic()
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.')))
    .then_some(scheme)
}

/// The containerd rule: the first path component is a registry only when it contains `.` or
/// `:` or is exactly `localhost` (a bracketed IPv6 literal contains `:`).
fn looks_like_registry(first: &str) -> bool {
    first.contains(['.', ':']) || first == "localhost" || first.starts_with('[')
}

/// A reference without any `/` that is just `host:port` (`example.com:5000`,
/// `localhost:5000`, `[::1]:5000`): the user named a registry and forgot the repository.
/// (Docker would read `example.com:5000` as `library/example.com` tagged `5000`, which is
/// never what was meant.)
fn names_registry_only(rest: &str) -> bool {
    if rest.contains('/') {
        return false;
    }
    if rest.starts_with('[') {
        return true;
    }
    match rest.split_once(':') {
        Some((host, port)) => {
            (host.contains('.') || host == "localhost")
                && !port.is_empty()
                && port.bytes().all(|b| b.is_ascii_digit())
        }
        None => false,
    }
}

/// Splits `host[:port]` (with `[v6]` hosts); the port is whatever follows the last `:` that is
/// outside brackets.
fn split_port(registry: &str) -> (&str, Option<&str>) {
    let bracket_end = if registry.starts_with('[') {
        registry.find(']').map_or(registry.len(), |i| i + 1)
    } else {
        0
    };
    match registry[bracket_end..].find(':') {
        Some(i) => (
            &registry[..bracket_end + i],
            Some(&registry[bracket_end + i + 1..]),
        ),
        None => (registry, None),
    }
}

/// Validates `host[:port]` and lowercases the host; `None` when it is not a valid host.
fn normalize_host(registry: &str) -> Option<String> {
    let (host, port) = split_port(registry);
    if let Some(port) = port {
        let ok = !port.is_empty()
            && port.len() <= 5
            && port.bytes().all(|b| b.is_ascii_digit())
            && port.parse::<u32>().is_ok_and(|p| p <= 65535);
        if !ok {
            return None;
        }
    }
    let valid_host = match host.strip_prefix('[') {
        Some(v6) => v6
            .strip_suffix(']')
            .is_some_and(|inner| inner.parse::<Ipv6Addr>().is_ok()),
        None => !host.is_empty() && host.split('.').all(is_dns_label),
    };
    valid_host.then(|| registry.to_ascii_lowercase())
}

/// `[A-Za-z0-9]` or `[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9]`.
fn is_dns_label(label: &str) -> bool {
    let bytes = label.as_bytes();
    match (bytes.first(), bytes.last()) {
        (Some(first), Some(last)) => {
            first.is_ascii_alphanumeric()
                && last.is_ascii_alphanumeric()
                && bytes
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || *b == b'-')
        }
        _ => false,
    }
}

/// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
fn is_tag(tag: &str) -> bool {
    let bytes = tag.as_bytes();
    match bytes.first() {
        Some(first) if bytes.len() <= MAX_TAG_LEN => {
            (first.is_ascii_alphanumeric() || *first == b'_')
                && bytes
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        }
        _ => false,
    }
}

/// `[a-z0-9]+(?:(?:[._]|__|[-]*)[a-z0-9]+)*`: runs of lowercase alphanumerics, separated by
/// one `.`, one `_`, `__`, or any number of `-`.
fn is_path_component(component: &str) -> bool {
    let is_alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = component.as_bytes();
    let mut i = 0;
    loop {
        // An alphanumeric run, at least one byte.
        let start = i;
        while bytes.get(i).is_some_and(is_alnum) {
            i += 1;
        }
        if i == start {
            return false;
        }
        if i == bytes.len() {
            return true;
        }
        // A separator, followed by another run.
        let sep_start = i;
        while bytes.get(i).is_some_and(|b| !is_alnum(b)) {
            i += 1;
        }
        let separator = &bytes[sep_start..i];
        let ok = matches!(separator, b"." | b"_" | b"__") || separator.iter().all(|b| *b == b'-');
        if !ok {
            return false;
        }
    }
}

/// `s` cut to at most `max` bytes (on a char boundary), marked with `…` when cut.
fn shorten(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    const D256: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn parse(s: &str) -> ImageRef {
        match ImageRef::parse(s) {
            Ok(r) => r,
            Err(e) => panic!("{s}: {e}"),
        }
    }

    fn error(s: &str) -> RefError {
        match ImageRef::parse(s) {
            Ok(r) => panic!("{s}: parsed as {r}"),
            Err(e) => e,
        }
    }

    #[test]
    fn docker_hub_forms_normalize_alike() {
        for s in [
            "nginx",
            "nginx:latest",
            "library/nginx",
            "docker.io/nginx",
            "docker.io/library/nginx",
            "index.docker.io/nginx",
            "index.docker.io/library/nginx:latest",
            "registry-1.docker.io/library/nginx",
        ] {
            let r = parse(s);
            assert_eq!(r.registry(), DOCKER_HUB, "{s}");
            assert_eq!(r.repository(), "library/nginx", "{s}");
            assert_eq!(r.to_string(), "index.docker.io/library/nginx:latest", "{s}");
            assert_eq!(r.api_host(), "registry-1.docker.io", "{s}");
            assert!(r.is_docker_hub());
        }
    }

    #[test]
    fn user_repositories_on_docker_hub() {
        let r = parse("myorg/app:1.0");
        assert_eq!(r.registry(), DOCKER_HUB);
        assert_eq!(r.repository(), "myorg/app");
        assert_eq!(r.tag(), Some("1.0"));
        assert_eq!(r.name(), "index.docker.io/myorg/app");
    }

    #[test]
    fn registry_detection() {
        for (s, registry, repository) in [
            ("localhost/app", "localhost", "app"),
            ("localhost:5000/a/b", "localhost:5000", "a/b"),
            ("127.0.0.1:5000/demo", "127.0.0.1:5000", "demo"),
            ("[::1]:5000/demo", "[::1]:5000", "demo"),
            ("[fe80::1]/x", "[fe80::1]", "x"),
            ("GHCR.io/o/r", "ghcr.io", "o/r"),
            ("example.com/app", "example.com", "app"),
            ("registry:5000/app", "registry:5000", "app"),
            ("a.b.c/d/e/f/g", "a.b.c", "d/e/f/g"),
        ] {
            let r = parse(s);
            assert_eq!(
                (r.registry(), r.repository()),
                (registry, repository),
                "{s}"
            );
            assert_eq!(r.api_host(), registry, "{s}");
        }
        // A single component is never a registry, even `localhost` or a dotted name.
        assert_eq!(
            parse("localhost").name(),
            "index.docker.io/library/localhost"
        );
        assert_eq!(
            parse("example.com").name(),
            "index.docker.io/library/example.com"
        );
    }

    #[test]
    fn tags_and_digests() {
        let r = parse("ghcr.io/o/r:v1");
        assert_eq!((r.tag(), r.digest()), (Some("v1"), None));
        assert_eq!(r.tag_form().as_deref(), Some("ghcr.io/o/r:v1"));
        assert_eq!(r.digest_form(), None);

        let r = parse(&format!("ghcr.io/o/r@{D256}"));
        assert_eq!((r.tag(), r.digest()), (None, Some(D256)));
        assert_eq!(r.tag_form(), None);
        assert_eq!(r.digest_form(), Some(format!("ghcr.io/o/r@{D256}")));
        assert_eq!(r.to_string(), format!("ghcr.io/o/r@{D256}"));

        let r = parse(&format!("ghcr.io/o/r:v1@{D256}"));
        assert_eq!((r.tag(), r.digest()), (Some("v1"), Some(D256)));
        assert_eq!(r.to_string(), format!("ghcr.io/o/r:v1@{D256}"));

        let sha512 = format!("sha512:{}", "ab".repeat(64));
        assert_eq!(
            parse(&format!("x/y@{sha512}")).digest(),
            Some(sha512.as_str())
        );

        // A port is not a tag; a tag after a port is.
        let r = parse("localhost:5000/app:5000");
        assert_eq!((r.registry(), r.tag()), ("localhost:5000", Some("5000")));
        let tag128 = "t".repeat(128);
        assert_eq!(parse(&format!("a:{tag128}")).tag(), Some(tag128.as_str()));
        assert_eq!(parse("a:_Under.Score-1").tag(), Some("_Under.Score-1"));
    }

    #[test]
    fn with_digest_keeps_name_and_tag() {
        let r = parse("nginx:1.27").with_digest(D256);
        assert_eq!(
            r.to_string(),
            format!("index.docker.io/library/nginx:1.27@{D256}")
        );
        assert!(is_digest(D256));
        assert!(!is_digest("sha256:abc"));
    }

    #[test]
    fn loopback_detection() {
        for (s, lo) in [
            ("127.0.0.1:5000/a", true),
            ("127.1.2.3/a", true),
            ("localhost/a", true),
            ("localhost:5000/a", true),
            ("[::1]:5000/a", true),
            ("[::1]/a", true),
            ("[0:0:0:0:0:0:0:1]/a", true),
            ("ghcr.io/a", false),
            ("10.0.0.1:5000/a", false),
            ("localhost.example.com/a", false),
            ("[fe80::1]/a", false),
            ("a", false),
        ] {
            assert_eq!(parse(s).is_loopback(), lo, "{s}");
        }
    }

    #[test]
    fn path_components() {
        for ok in [
            "a",
            "a1",
            "a.b",
            "a_b",
            "a__b",
            "a-b",
            "a---b",
            "a.b_c-d__e",
        ] {
            assert!(is_path_component(ok), "{ok}");
        }
        for bad in [
            "", "-a", "a-", ".a", "a.", "a..b", "a___b", "a._b", "a-.b", "A", "a$b", "_",
        ] {
            assert!(!is_path_component(bad), "{bad}");
        }
    }

    #[test]
    fn error_classes() {
        assert_eq!(error(""), RefError::Empty);
        assert!(matches!(error("nginx latest"), RefError::Whitespace { .. }));
        assert!(matches!(error("\tnginx"), RefError::Whitespace { .. }));
        assert!(
            matches!(error("https://ghcr.io/o/r"), RefError::Scheme { scheme, .. } if scheme == "https")
        );
        assert!(matches!(
            error("ghcr.io/o/r$"),
            RefError::InvalidChar { ch: '$', .. }
        ));
        assert!(matches!(
            error("ghcr.io/ö/r"),
            RefError::InvalidChar { ch: 'ö', .. }
        ));
        assert!(matches!(error(&"ab".repeat(32)), RefError::ImageId { .. }));
        let id = format!("sha256:{}", "ab".repeat(32));
        assert!(matches!(error(&id), RefError::ImageId { .. }));
        // A tag that merely starts like a digest algorithm is still a tag.
        assert!("sha256:v1".parse::<ImageRef>().is_ok());
        assert!(matches!(error("nginx:"), RefError::InvalidTag { .. }));
        assert!(matches!(error("nginx:.x"), RefError::InvalidTag { .. }));
        assert!(matches!(error("nginx:1:2"), RefError::InvalidTag { .. }));
        assert!(matches!(
            error(&format!("a:{}", "t".repeat(129))),
            RefError::InvalidTag { .. }
        ));
        assert!(matches!(error("nginx@"), RefError::InvalidDigest { .. }));
        assert!(matches!(
            error("nginx@sha256:abc"),
            RefError::InvalidDigest { .. }
        ));
        assert!(matches!(
            error(&format!("nginx@{}", D256.to_uppercase())),
            RefError::InvalidDigest { .. }
        ));
        assert!(matches!(
            error(&format!("nginx@md5:{}", "a".repeat(32))),
            RefError::InvalidDigest { .. }
        ));
        assert!(matches!(
            error(&format!("nginx@{D256}@{D256}")),
            RefError::InvalidDigest { .. }
        ));
        assert!(matches!(
            error("bad_host.io/x"),
            RefError::InvalidRegistry { .. }
        ));
        assert!(matches!(error("-a.io/x"), RefError::InvalidRegistry { .. }));
        assert!(matches!(
            error("a.io:99999/x"),
            RefError::InvalidRegistry { .. }
        ));
        assert!(matches!(error("a.io:/x"), RefError::InvalidRegistry { .. }));
        assert!(matches!(
            error("[zz::1]:5000/x"),
            RefError::InvalidRegistry { .. }
        ));
        assert!(matches!(error("[::1/x"), RefError::InvalidRegistry { .. }));
        for missing in [
            "example.com:5000",
            "localhost:5000",
            "[::1]:5000",
            "foo/",
            "ghcr.io/",
            ":tag",
            &format!("@{D256}"),
        ] {
            assert!(
                matches!(error(missing), RefError::MissingRepository { .. }),
                "{missing}: {}",
                error(missing)
            );
        }
        assert!(matches!(error("a//b"), RefError::EmptyComponent { .. }));
        assert!(matches!(
            error("ghcr.io/a//b"),
            RefError::EmptyComponent { .. }
        ));
        assert!(matches!(
            error("ghcr.io/a/-b"),
            RefError::InvalidComponent { .. }
        ));
        assert!(matches!(error("Foo"), RefError::Uppercase { .. }));
        assert!(matches!(
            error("ghcr.io/Org/app"),
            RefError::Uppercase { .. }
        ));
        assert!(matches!(
            error(&format!("ghcr.io/{}", "a".repeat(250))),
            RefError::NameTooLong { len: 258, .. }
        ));
    }

    #[test]
    fn error_messages_name_the_input() {
        assert_eq!(
            error("Foo:bar").to_string(),
            r#"invalid image reference "Foo:bar": repository name must be lowercase"#
        );
        assert_eq!(
            error("example.com:5000").to_string(),
            r#"invalid image reference "example.com:5000": missing repository name"#
        );
        assert!(error("nginx:-x").to_string().contains(r#""nginx:-x""#));
    }

    #[test]
    fn name_length_counts_like_containerd() {
        // docker.io/library/<n>: 18 + n characters.
        let ok = "a".repeat(255 - 18);
        assert_eq!(parse(&ok).repository().len(), 255 - 18 + 8);
        assert!(matches!(
            error(&format!("{ok}a")),
            RefError::NameTooLong { len: 256, .. }
        ));
    }

    #[test]
    fn huge_input_is_rejected_cheaply() {
        let huge = "a".repeat(MAX_REFERENCE_LEN + 1);
        let err = error(&huge);
        assert!(matches!(err, RefError::TooLong { len: 4097, .. }));
        assert!(err.to_string().len() < 200);
        // Long but allowed inputs are echoed shortened.
        let long = format!("ghcr.io/o/r:{}", "$".repeat(3000));
        assert!(error(&long).to_string().len() < 400);
    }

    #[test]
    fn from_str_and_display_round_trip() {
        for s in [
            "index.docker.io/library/nginx:1.27",
            "ghcr.io/o/r:v1",
            "localhost:5000/a/b:c",
            "[::1]:5000/demo:latest",
        ] {
            let r: ImageRef = s.parse().unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(r.to_string(), s);
            assert_eq!(parse(&r.to_string()), r);
        }
    }
}
