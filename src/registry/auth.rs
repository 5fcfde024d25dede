//! Registry credentials: explicit flags, a docker `config.json`, and the bearer-token
//! challenge of the distribution token protocol.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::Deserialize;

/// Credentials for one registry.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    Basic {
        username: String,
        password: String,
    },
    /// A registry bearer token sent as is.
    Bearer(String),
}

impl Credential {
    /// Who this credential is, as a keyed hash: equal credentials give equal identities within
    /// one process, and the secret cannot be read back from it (the key is random per process,
    /// so the hash cannot be tried against guessed passwords elsewhere).
    pub fn identity(&self) -> String {
        let mut ctx = aws_lc_rs::hmac::Context::with_key(identity_key());
        match self {
            Credential::Basic { username, password } => {
                ctx.update(b"basic\0");
                ctx.update(&(username.len() as u64).to_be_bytes());
                ctx.update(username.as_bytes());
                ctx.update(password.as_bytes());
            }
            Credential::Bearer(token) => {
                ctx.update(b"bearer\0");
                ctx.update(token.as_bytes());
            }
        }
        hex::encode(&ctx.sign().as_ref()[..16])
    }
}

/// The per-process key of [`Credential::identity`].
fn identity_key() -> &'static aws_lc_rs::hmac::Key {
    static KEY: std::sync::OnceLock<aws_lc_rs::hmac::Key> = std::sync::OnceLock::new();
    KEY.get_or_init(|| {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        aws_lc_rs::hmac::Key::generate(aws_lc_rs::hmac::HMAC_SHA256, &rng).unwrap_or_else(|_| {
            // No system randomness: a fixed key still hides the secret behind a hash.
            aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, b"pullgate identity")
        })
    })
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::Basic { username, .. } => write!(f, "Basic({username}, <redacted>)"),
            Credential::Bearer(_) => write!(f, "Bearer(<redacted>)"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("cannot read docker config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid docker config {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// Credentials by registry host (`index.docker.io` for Docker Hub). Each credential is
/// answered only to the host (`host[:port]`, the port included) it is filed under: there is no
/// credential for "any registry".
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    by_host: HashMap<String, Credential>,
}

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: HashMap<String, DockerAuth>,
    /// A credential helper holding every registry's credentials (`docker-credential-NAME`).
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
    /// Credential helpers by registry, ahead of `credsStore` and `auths`.
    #[serde(default, rename = "credHelpers")]
    cred_helpers: HashMap<String, String>,
}

/// What a credential helper answers to `get`.
#[derive(Deserialize)]
struct HelperCredential {
    #[serde(rename = "Username")]
    username: String,
    #[serde(rename = "Secret")]
    secret: String,
}

/// A credential helper may take this long to answer (it may ask a keychain or a cloud API).
const HELPER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Registries read from one `credsStore` at most.
const MAX_STORE_ENTRIES: usize = 64;

#[derive(Deserialize)]
struct DockerAuth {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    registrytoken: Option<String>,
}

const MAX_CONFIG_BYTES: u64 = 1 << 20;

impl Credentials {
    pub fn insert(&mut self, host: &str, credential: Credential) {
        self.by_host.insert(normalize_host(host), credential);
    }

    /// Reads a docker `config.json` as the docker CLI does: `credHelpers` first, then
    /// `credsStore`, then `auths`. Helpers (`docker-credential-NAME` on `PATH`) are asked once,
    /// here; one that is missing or fails is skipped with a warning, so that registry is then
    /// reached anonymously (a private one answers with a clear 401 reason).
    pub fn from_docker_config(path: &Path) -> Result<Credentials, CredentialError> {
        let read_err = |source| CredentialError::Read {
            path: path.to_path_buf(),
            source,
        };
        let invalid = |message: String| CredentialError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let meta = std::fs::metadata(path).map_err(read_err)?;
        if meta.len() > MAX_CONFIG_BYTES {
            return Err(invalid(format!("larger than {MAX_CONFIG_BYTES} bytes")));
        }
        let text = std::fs::read(path).map_err(read_err)?;
        let config: DockerConfig =
            serde_json::from_slice(&text).map_err(|e| invalid(e.to_string()))?;
        let mut from_helpers = Credentials::default();
        for (host, helper) in &config.cred_helpers {
            if let Some(c) = helper_get(helper, host) {
                from_helpers.insert(host, c);
            }
        }
        if let Some(store) = config.creds_store.as_deref().filter(|s| !s.is_empty()) {
            for host in helper_list(store) {
                if from_helpers.by_host.contains_key(&normalize_host(&host)) {
                    continue;
                }
                if let Some(c) = helper_get(store, &host) {
                    from_helpers.insert(&host, c);
                }
            }
        }
        from_helpers.merge(Credentials::from_auths(config.auths).map_err(invalid)?);
        Ok(from_helpers)
    }

    /// Credentials from docker `config.json` text (`{"auths": {HOST: …}}`). Credential helpers
    /// named in it are never run: this text may come from a cluster (a pull Secret).
    pub fn from_docker_config_json(text: &[u8]) -> Result<Credentials, String> {
        let config: DockerConfig = serde_json::from_slice(text).map_err(|e| e.to_string())?;
        Credentials::from_auths(config.auths)
    }

    /// Credentials from a legacy `.dockercfg` (`{HOST: {auth, …}}`, no `auths` wrapper), as
    /// `kubernetes.io/dockercfg` Secrets hold.
    pub fn from_dockercfg_json(text: &[u8]) -> Result<Credentials, String> {
        let auths: HashMap<String, DockerAuth> =
            serde_json::from_slice(text).map_err(|e| e.to_string())?;
        Credentials::from_auths(auths)
    }

    fn from_auths(auths: HashMap<String, DockerAuth>) -> Result<Credentials, String> {
        let mut creds = Credentials::default();
        for (host, entry) in auths {
            let credential = if let Some(token) = entry.registrytoken {
                Credential::Bearer(token)
            } else if let (Some(username), Some(password)) = (entry.username, entry.password) {
                Credential::Basic { username, password }
            } else if let Some(auth) = entry.auth.filter(|a| !a.is_empty()) {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(auth.trim())
                    .map_err(|e| format!("auths.{host}.auth is not base64: {e}"))?;
                let decoded = String::from_utf8(decoded)
                    .map_err(|_| format!("auths.{host}.auth is not UTF-8"))?;
                let Some((username, password)) = decoded.split_once(':') else {
                    return Err(format!("auths.{host}.auth is not user:password"));
                };
                Credential::Basic {
                    username: username.to_string(),
                    password: password.to_string(),
                }
            } else {
                continue;
            };
            creds.insert(&host, credential);
        }
        Ok(creds)
    }

    /// Adds `other`'s hosts that `self` does not have (the first pull secret naming a host
    /// wins, as kubelet tries them in order).
    pub fn merge(&mut self, other: Credentials) {
        for (host, credential) in other.by_host {
            self.by_host.entry(host).or_insert(credential);
        }
    }

    /// The docker config the docker CLI would read: `$DOCKER_CONFIG/config.json` or
    /// `~/.docker/config.json`, when it exists.
    pub fn default_docker_config_path() -> Option<PathBuf> {
        let dir = std::env::var_os("DOCKER_CONFIG")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker")))?;
        let path = dir.join("config.json");
        path.is_file().then_some(path)
    }

    /// The credential filed for exactly `host` (`host[:port]`; Docker Hub's spellings are one
    /// host), if any.
    pub fn for_host(&self, host: &str) -> Option<&Credential> {
        self.by_host.get(&normalize_host(host))
    }
}

/// Runs `docker-credential-HELPER ARG` with `input` on stdin; its stdout when it succeeds.
fn run_helper(helper: &str, arg: &str, input: &str) -> Result<Vec<u8>, String> {
    use std::io::{Read as _, Write as _};
    use std::process::{Command, Stdio};
    if helper.is_empty()
        || !helper
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return Err(format!("{helper:?} is not a credential helper name"));
    }
    let program = format!("docker-credential-{helper}");
    let mut child = Command::new(&program)
        .arg(arg)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("{program}: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A helper that exits without reading its input is answered by its exit status.
        let _ = stdin.write_all(input.as_bytes());
    }
    let mut stdout = child.stdout.take().ok_or("no stdout")?;
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = (&mut stdout).take(MAX_CONFIG_BYTES).read_to_end(&mut out);
        out
    });
    let deadline = std::time::Instant::now() + HELPER_TIMEOUT;
    let status = loop {
        match child.try_wait().map_err(|e| format!("{program}: {e}"))? {
            Some(status) => break status,
            None if std::time::Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{program} {arg}: no answer in {HELPER_TIMEOUT:?}"));
            }
            None => std::thread::sleep(std::time::Duration::from_millis(10)),
        }
    };
    let out = reader.join().unwrap_or_default();
    if !status.success() {
        let said = String::from_utf8_lossy(&out);
        return Err(format!("{program} {arg}: {status}: {}", said.trim()));
    }
    Ok(out)
}

/// The credential `helper` holds for `server`, or `None` (with a warning when it failed).
fn helper_get(helper: &str, server: &str) -> Option<Credential> {
    let answer = run_helper(helper, "get", server).and_then(|out| {
        serde_json::from_slice::<HelperCredential>(&out)
            .map_err(|e| format!("docker-credential-{helper} get: {e}"))
    });
    match answer {
        // `<token>` marks an identity token (an OAuth refresh token), which pullgate does
        // not exchange.
        Ok(c) if c.username == "<token>" => {
            tracing::warn!(helper, server, "credential helper gave an identity token, which is not supported; {server} is reached anonymously");
            None
        }
        Ok(c) => Some(Credential::Basic {
            username: c.username,
            password: c.secret,
        }),
        Err(e) => {
            tracing::warn!(
                helper,
                server,
                "credential helper failed, {server} is reached anonymously: {e}"
            );
            None
        }
    }
}

/// The registries `helper` holds credentials for (`list`), at most [`MAX_STORE_ENTRIES`].
fn helper_list(helper: &str) -> Vec<String> {
    let listed = run_helper(helper, "list", "").and_then(|out| {
        serde_json::from_slice::<HashMap<String, String>>(&out)
            .map_err(|e| format!("docker-credential-{helper} list: {e}"))
    });
    match listed {
        Ok(map) => {
            let mut hosts: Vec<String> = map.into_keys().collect();
            hosts.sort();
            hosts.truncate(MAX_STORE_ENTRIES);
            hosts
        }
        Err(e) => {
            tracing::warn!(helper, "credential store cannot list its registries: {e}");
            Vec::new()
        }
    }
}

/// `https://index.docker.io/v1/`, `docker.io` and `registry-1.docker.io` all name Docker Hub.
fn normalize_host(key: &str) -> String {
    let without_scheme = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = without_scheme.split('/').next().unwrap_or_default();
    match host {
        "docker.io" | "registry-1.docker.io" | "index.docker.io" => "index.docker.io".into(),
        other => other.to_ascii_lowercase(),
    }
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

/// Parses `Bearer realm="…",service="…",scope="…"` or `Basic realm="…"`.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let (scheme, rest) = header.trim().split_once(' ').unwrap_or((header.trim(), ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut params: HashMap<String, String> = HashMap::new();
    let mut rest = rest.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let after = after.trim_start();
        let (value, remainder) = if let Some(quoted) = after.strip_prefix('"') {
            let end = quoted.find('"')?;
            (&quoted[..end], &quoted[end + 1..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (&after[..end], &after[end..])
        };
        params.insert(key, value.to_string());
        rest = remainder.trim_start().trim_start_matches(',').trim_start();
    }
    Some(Challenge::Bearer {
        realm: params.remove("realm")?,
        service: params.remove("service"),
        scope: params.remove("scope"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.example.com/token",service="registry.example.com",scope="repository:a/b:pull""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.example.com/token".into(),
                service: Some("registry.example.com".into()),
                scope: Some("repository:a/b:pull".into()),
            })
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="x""#),
            Some(Challenge::Basic)
        );
        assert_eq!(parse_challenge("Negotiate"), None);
        assert_eq!(parse_challenge(r#"Bearer service="x""#), None);
    }

    #[test]
    fn docker_config_forms() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(
            &path,
            r#"{"auths":{
                "https://index.docker.io/v1/":{"auth":"dXNlcjpwYXNz"},
                "127.0.0.1:5000":{"username":"u","password":"p"},
                "ghcr.io":{"registrytoken":"tok"},
                "empty.example":{}
            }}"#,
        )
        .unwrap();
        let creds = Credentials::from_docker_config(&path).unwrap();
        assert_eq!(
            creds.for_host("index.docker.io"),
            Some(&Credential::Basic {
                username: "user".into(),
                password: "pass".into()
            })
        );
        assert!(matches!(
            creds.for_host("127.0.0.1:5000"),
            Some(Credential::Basic { .. })
        ));
        assert_eq!(
            creds.for_host("ghcr.io"),
            Some(&Credential::Bearer("tok".into()))
        );
        assert_eq!(creds.for_host("empty.example"), None);
    }

    #[test]
    fn a_credential_is_for_its_host_only() {
        let mut creds = Credentials::default();
        let c = Credential::Basic {
            username: "u".into(),
            password: "p".into(),
        };
        creds.insert("127.0.0.1:5000", c.clone());
        assert_eq!(creds.for_host("127.0.0.1:5000"), Some(&c));
        // The port is part of the host.
        assert_eq!(creds.for_host("127.0.0.1:5001"), None);
        assert_eq!(creds.for_host("127.0.0.1"), None);
        assert_eq!(creds.for_host("ghcr.io"), None);
        creds.insert("docker.io", c.clone());
        assert_eq!(creds.for_host("index.docker.io"), Some(&c));
    }

    #[test]
    fn identities_hide_the_secret_and_tell_credentials_apart() {
        let basic = |u: &str, p: &str| Credential::Basic {
            username: u.into(),
            password: p.into(),
        };
        let a = basic("user", "secret-password");
        assert_eq!(a.identity(), basic("user", "secret-password").identity());
        assert_ne!(a.identity(), basic("user", "other").identity());
        // The split between user and password is part of the identity.
        assert_ne!(basic("ab", "c").identity(), basic("a", "bc").identity());
        assert_ne!(
            Credential::Bearer("t".into()).identity(),
            basic("t", "").identity()
        );
        assert!(!a.identity().contains("secret"));
        assert_eq!(a.identity().len(), 32);
    }

    #[test]
    fn docker_config_errors_are_clear() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, r#"{"auths":{"x":{"auth":"%%%"}}}"#).unwrap();
        let err = Credentials::from_docker_config(&path).unwrap_err();
        assert!(
            err.to_string().contains("auths.x.auth is not base64"),
            "{err}"
        );
        std::fs::write(&path, "not json").unwrap();
        assert!(Credentials::from_docker_config(&path).is_err());
    }
}
