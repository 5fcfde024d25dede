//! A small, strict TUF (The Update Framework, spec 1.0) client for TrustRoots that name a TUF
//! repository (`spec.repository`, `spec.remote`), and the trust material read from it.
//!
//! Workflow (spec §5): the root from the TrustRoot is trusted as given (and must be signed by
//! its own threshold); `N+1.root.json` is applied while the repository has one, each signed by
//! a threshold of the old *and* the new root keys; then timestamp → snapshot → targets, each
//! signed by its role's threshold, unexpired, and matching the version, length and hashes the
//! referring metadata states. Only top-level targets are read: a target that would need a
//! delegation is an error. Targets are checked by length and SHA-256/SHA-512.
//!
//! The target read is Sigstore's `trusted_root.json` (or the TrustRoot's `trustedRootTarget`);
//! a repository without it may carry the legacy targets marked with custom metadata
//! `sigstore.usage` (Fulcio, CTFE, Rekor, TSA), as policy-controller reads them.
//!
//! Fetching is behind [`Fetch`]: an in-memory tarball (`repository.mirrorFS`) or HTTP(S)
//! (`remote`, in `policy::tuf_remote`). Nothing here touches the network itself.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read as _;

use base64::Engine as _;
use serde_json::Value;
use sha2::Digest as _;

use super::keys::{HashAlgorithm, PublicKey};
use super::trust_root::{self, CertificateAuthority, TrustMaterial, Validity};
use super::x509::Cert;

/// Largest metadata file accepted (root, timestamp, snapshot, targets).
pub const MAX_METADATA_BYTES: u64 = 4 << 20;
/// Largest target file accepted.
pub const MAX_TARGET_BYTES: u64 = 8 << 20;
/// Largest unpacked `mirrorFS` archive.
const MAX_ARCHIVE_BYTES: u64 = 64 << 20;
/// Most files in a `mirrorFS` archive.
const MAX_ARCHIVE_FILES: usize = 10_000;
/// Most root rotations applied in one update (the spec's bound against endless rotation).
const MAX_ROOT_ROTATIONS: u64 = 1024;
/// Most legacy targets read.
const MAX_LEGACY_TARGETS: usize = 64;

/// The default name of Sigstore's trusted root target.
pub const DEFAULT_TRUSTED_ROOT_TARGET: &str = "trusted_root.json";

/// Errors of a TUF update; each names the file or role at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("{file}: malformed: {reason}")]
    Malformed { file: String, reason: String },
    #[error("{file}: {have} valid signature(s) from the {role} role, {need} required")]
    Threshold {
        file: String,
        role: String,
        have: usize,
        need: u64,
    },
    #[error("{file}: expired at {expires}")]
    Expired { file: String, expires: String },
    #[error("{file}: version {found}, expected {expected}")]
    Version {
        file: String,
        found: u64,
        expected: String,
    },
    #[error("{file}: {what} does not match the one recorded in {by}")]
    Mismatch {
        file: String,
        what: &'static str,
        by: String,
    },
    #[error("{file}: larger than {max} bytes")]
    TooLarge { file: String, max: u64 },
    #[error("{file}: not found in the TUF repository")]
    Missing { file: String },
    #[error("{file}: could not be fetched: {reason}")]
    Fetch { file: String, reason: String },
    #[error("target {target:?} is not listed in the top-level targets and the repository delegates targets; delegated targets are not supported by this version of pullgate")]
    Delegated { target: String },
    #[error("the repository has no target {target:?} and no legacy Sigstore targets")]
    NoTrustedRoot { target: String },
    #[error("mirrorFS: {0}")]
    Archive(String),
    #[error("target {target}: {reason}")]
    Target { target: String, reason: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where the repository's files come from. Paths are relative to the repository (metadata at
/// the top, targets under the targets directory).
pub trait Fetch {
    /// The file's bytes, `Ok(None)` when it does not exist, at most `max` bytes.
    fn fetch(&mut self, path: &str, max: u64) -> Result<Option<Vec<u8>>>;
}

/// A `mirrorFS` repository unpacked in memory.
pub struct MemoryRepo {
    files: HashMap<String, Vec<u8>>,
}

impl MemoryRepo {
    /// Unpacks a gzipped tar (policy-controller's `mirrorFS`, already base64-decoded). A
    /// leading `repository/` directory is stripped, as policy-controller does.
    pub fn from_tar_gz(bytes: &[u8]) -> Result<MemoryRepo> {
        let err = |e: std::io::Error| Error::Archive(format!("not a gzipped tar: {e}"));
        let gz = flate2::read::GzDecoder::new(bytes).take(MAX_ARCHIVE_BYTES + 1);
        let mut archive = tar::Archive::new(gz);
        let mut files = HashMap::new();
        let mut total = 0u64;
        for entry in archive.entries().map_err(err)? {
            let mut entry = entry.map_err(err)?;
            if !entry.header().entry_type().is_file() {
                continue;
            }
            if files.len() >= MAX_ARCHIVE_FILES {
                return Err(Error::Archive(format!(
                    "more than {MAX_ARCHIVE_FILES} files"
                )));
            }
            let raw = entry.path_bytes().into_owned();
            let name = String::from_utf8(raw)
                .map_err(|_| Error::Archive("a file name is not UTF-8".into()))?;
            let path = normalize(&name)
                .ok_or_else(|| Error::Archive(format!("unsafe file name {name:?}")))?;
            let size = entry.header().size().map_err(err)?;
            total = total.saturating_add(size);
            if size > MAX_TARGET_BYTES.max(MAX_METADATA_BYTES) || total > MAX_ARCHIVE_BYTES {
                return Err(Error::Archive(format!(
                    "larger than {MAX_ARCHIVE_BYTES} bytes unpacked, or a file over {MAX_TARGET_BYTES} bytes"
                )));
            }
            let mut data = Vec::with_capacity(size as usize);
            entry
                .by_ref()
                .take(size)
                .read_to_end(&mut data)
                .map_err(err)?;
            files.insert(path, data);
        }
        if files.is_empty() {
            return Err(Error::Archive("the archive holds no files".into()));
        }
        Ok(MemoryRepo { files })
    }
}

/// `./repository/a/b` → `a/b`; `None` for `..` or empty names.
fn normalize(name: &str) -> Option<String> {
    let parts: Vec<&str> = name
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    if parts.is_empty() || parts.contains(&"..") {
        return None;
    }
    let parts = match parts.as_slice() {
        ["repository", rest @ ..] if !rest.is_empty() => rest,
        all => all,
    };
    Some(parts.join("/"))
}

impl Fetch for MemoryRepo {
    fn fetch(&mut self, path: &str, max: u64) -> Result<Option<Vec<u8>>> {
        match self.files.get(path) {
            None => Ok(None),
            Some(data) if data.len() as u64 > max => Err(Error::TooLarge {
                file: path.to_string(),
                max,
            }),
            Some(data) => Ok(Some(data.clone())),
        }
    }
}

/// What a TUF TrustRoot yields: keyless trust material and the transparency logs (Rekor),
/// with their base URLs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TufTrust {
    pub material: TrustMaterial,
    pub tlogs: Vec<(String, PublicKey)>,
    /// Versions of the verified metadata (root, timestamp, snapshot, targets), for rollback
    /// checks on the next update.
    pub versions: Versions,
    /// When the verified metadata stops being valid; `None` for trust not read through TUF.
    pub expires: Option<Expiry>,
}

/// When verified TUF metadata expires: the trust it yields may be used until then only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expiry {
    /// `timestamp.json`'s expiry (Unix seconds), usually the first to come.
    pub timestamp: i64,
    /// The earliest expiry of root, timestamp, snapshot and targets (Unix seconds) …
    pub earliest: i64,
    /// … and the role it belongs to.
    pub earliest_role: &'static str,
}

impl Expiry {
    /// Whether the metadata is expired at `now` (Unix seconds).
    pub fn expired(&self, now: i64) -> bool {
        self.earliest <= now
    }

    /// `2026-12-08T00:00:00Z (snapshot.json)`.
    pub fn describe(&self) -> String {
        let at = jiff::Timestamp::from_second(self.earliest)
            .map(|t| t.to_string())
            .unwrap_or_else(|_| self.earliest.to_string());
        format!("{at} ({}.json)", self.earliest_role)
    }
}

/// Versions of the metadata a client trusted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Versions {
    pub root: u64,
    pub timestamp: u64,
    pub snapshot: u64,
    pub targets: u64,
}

/// A TrustRoot's `root` (base64 of root.json, as policy-controller stores `[]byte`; raw JSON
/// is accepted too).
pub fn decode_root(value: &str) -> Result<Vec<u8>> {
    let trimmed = value.trim();
    if trimmed.starts_with('{') {
        return Ok(trimmed.as_bytes().to_vec());
    }
    decode_b64(trimmed).map_err(|reason| Error::Malformed {
        file: "spec root".into(),
        reason,
    })
}

/// Base64 (whitespace ignored).
pub fn decode_b64(value: &str) -> std::result::Result<Vec<u8>, String> {
    let compact: String = value.split_whitespace().collect();
    base64::engine::general_purpose::STANDARD
        .decode(compact.as_bytes())
        .map_err(|e| format!("not base64: {e}"))
}

/// Runs the TUF client workflow against `repo` from `trusted_root_json` and reads the Sigstore
/// trust material. `now` is in Unix seconds; `previous` are the versions trusted before (for
/// rollback protection across updates of one repository).
pub fn update(
    repo: &mut dyn Fetch,
    trusted_root_json: &[u8],
    targets_dir: &str,
    trusted_root_target: &str,
    now: i64,
    previous: Option<Versions>,
) -> Result<TufTrust> {
    let mut client = Client::new(repo, trusted_root_json, now, previous)?;
    client.refresh()?;
    let versions = client.versions();
    let expires = client.expiry()?;
    let mut trust = client.sigstore_trust(targets_dir, trusted_root_target)?;
    trust.versions = versions;
    trust.expires = Some(expires);
    Ok(trust)
}

// ---------------------------------------------------------------------------------------------
// Metadata

struct Key {
    public: PublicKey,
    /// The key's value, to count one key once however many ids name it.
    identity: Vec<u8>,
}

struct Role {
    keyids: Vec<String>,
    threshold: u64,
}

struct Root {
    version: u64,
    expires: i64,
    consistent_snapshot: bool,
    keys: HashMap<String, Key>,
    roles: HashMap<String, Role>,
}

/// A parsed metadata file: the signed part (as JSON and as canonical bytes) and signatures.
struct Signed {
    file: String,
    signed: Value,
    canonical: Vec<u8>,
    signatures: Vec<(String, Vec<u8>)>,
}

fn malformed(file: &str, reason: impl Into<String>) -> Error {
    Error::Malformed {
        file: file.to_string(),
        reason: reason.into(),
    }
}

impl Signed {
    fn parse(file: &str, bytes: &[u8], role: &str) -> Result<Signed> {
        let doc: Value =
            serde_json::from_slice(bytes).map_err(|e| malformed(file, format!("not JSON: {e}")))?;
        let signed = doc
            .get("signed")
            .filter(|s| s.is_object())
            .ok_or_else(|| malformed(file, "no \"signed\" object"))?
            .clone();
        let sigs = doc
            .get("signatures")
            .and_then(Value::as_array)
            .ok_or_else(|| malformed(file, "no \"signatures\" list"))?;
        let mut signatures = Vec::new();
        for s in sigs {
            let keyid = s.get("keyid").and_then(Value::as_str);
            let sig = s.get("sig").and_then(Value::as_str);
            let (Some(keyid), Some(sig)) = (keyid, sig) else {
                return Err(malformed(file, "a signature lacks keyid or sig"));
            };
            // An unreadable signature cannot count; it is not fatal (another may suffice).
            if let Ok(sig) = hex::decode(sig) {
                signatures.push((keyid.to_string(), sig));
            }
        }
        let kind = signed.get("_type").and_then(Value::as_str);
        if kind != Some(role) {
            return Err(malformed(
                file,
                format!("_type is {kind:?}, expected {role:?}"),
            ));
        }
        let spec = signed
            .get("spec_version")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if spec.split('.').next() != Some("1") {
            return Err(malformed(file, format!("spec_version {spec:?} is not 1.x")));
        }
        let canonical = canonical_json(&signed).map_err(|reason| malformed(file, reason))?;
        Ok(Signed {
            file: file.to_string(),
            signed,
            canonical,
            signatures,
        })
    }

    fn version(&self) -> Result<u64> {
        self.signed
            .get("version")
            .and_then(Value::as_u64)
            .filter(|v| *v >= 1)
            .ok_or_else(|| malformed(&self.file, "version is not a positive integer"))
    }

    fn expires(&self) -> Result<i64> {
        let text = self
            .signed
            .get("expires")
            .and_then(Value::as_str)
            .ok_or_else(|| malformed(&self.file, "no expires"))?;
        text.parse::<jiff::Timestamp>()
            .map(|t| t.as_second())
            .map_err(|e| malformed(&self.file, format!("expires {text:?}: {e}")))
    }

    fn check_expiry(&self, now: i64) -> Result<()> {
        let expires = self.expires()?;
        if expires <= now {
            return Err(Error::Expired {
                file: self.file.clone(),
                expires: jiff::Timestamp::from_second(expires)
                    .map(|t| t.to_string())
                    .unwrap_or_else(|_| expires.to_string()),
            });
        }
        Ok(())
    }

    /// Checks that `role` of `root` signed this file with at least its threshold of distinct
    /// keys.
    fn verify_role(&self, root: &Root, role: &str) -> Result<()> {
        let r = root
            .roles
            .get(role)
            .ok_or_else(|| malformed(&self.file, format!("the root defines no {role} role")))?;
        let allowed: HashSet<&str> = r.keyids.iter().map(String::as_str).collect();
        let mut counted: HashSet<&[u8]> = HashSet::new();
        for (keyid, sig) in &self.signatures {
            if !allowed.contains(keyid.as_str()) {
                continue;
            }
            let Some(key) = root.keys.get(keyid) else {
                continue;
            };
            if counted.contains(key.identity.as_slice()) {
                continue;
            }
            if key
                .public
                .verify(HashAlgorithm::Sha256, &self.canonical, sig)
            {
                counted.insert(&key.identity);
            }
        }
        if (counted.len() as u64) < r.threshold {
            return Err(Error::Threshold {
                file: self.file.clone(),
                role: role.to_string(),
                have: counted.len(),
                need: r.threshold,
            });
        }
        Ok(())
    }
}

impl Root {
    fn from_signed(s: &Signed) -> Result<Root> {
        let file = &s.file;
        let obj = |v: &Value, what: &str| -> Result<serde_json::Map<String, Value>> {
            v.get(what)
                .and_then(Value::as_object)
                .cloned()
                .ok_or_else(|| malformed(file, format!("no {what} object")))
        };
        let mut keys = HashMap::new();
        for (id, k) in obj(&s.signed, "keys")? {
            // Keys of types this client cannot verify are kept out; they cannot count towards
            // a threshold (TUF spec: unknown key types are ignored).
            if let Some(key) = parse_key(k) {
                keys.insert(id, key);
            }
        }
        let mut roles = HashMap::new();
        for (name, r) in obj(&s.signed, "roles")? {
            let threshold = r
                .get("threshold")
                .and_then(Value::as_u64)
                .filter(|t| *t >= 1)
                .ok_or_else(|| malformed(file, format!("role {name}: threshold below 1")))?;
            let keyids = r
                .get("keyids")
                .and_then(Value::as_array)
                .ok_or_else(|| malformed(file, format!("role {name}: no keyids")))?
                .iter()
                .map(|k| k.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| malformed(file, format!("role {name}: a keyid is not text")))?;
            roles.insert(name, Role { keyids, threshold });
        }
        for role in ["root", "timestamp", "snapshot", "targets"] {
            if !roles.contains_key(role) {
                return Err(malformed(file, format!("no {role} role")));
            }
        }
        Ok(Root {
            version: s.version()?,
            expires: s.expires()?,
            consistent_snapshot: s
                .signed
                .get("consistent_snapshot")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            keys,
            roles,
        })
    }
}

/// A key of a supported type: `ecdsa-sha2-nistp256`/`ecdsa` (PEM) or `ed25519` (hex).
fn parse_key(k: Value) -> Option<Key> {
    let keytype = k.get("keytype")?.as_str()?;
    let scheme = k.get("scheme")?.as_str()?;
    let public = k.get("keyval")?.get("public")?.as_str()?;
    match (keytype, scheme) {
        ("ecdsa-sha2-nistp256" | "ecdsa", "ecdsa-sha2-nistp256") => {
            use p256::elliptic_curve::sec1::ToEncodedPoint as _;
            use p256::pkcs8::DecodePublicKey as _;
            let key = PublicKey::from_pem(public).ok()?;
            if key.algorithm() != "ecdsa-p256" {
                return None;
            }
            // The same point can be written compressed or uncompressed: the identity is the
            // uncompressed point, so one key never counts twice whatever its encodings.
            let point = p256::PublicKey::from_public_key_der(key.spki_der())
                .ok()?
                .to_encoded_point(false);
            Some(Key {
                identity: point.as_bytes().to_vec(),
                public: key,
            })
        }
        ("ed25519", "ed25519") => {
            let raw = hex::decode(public).ok()?;
            if raw.len() != 32 {
                return None;
            }
            // SubjectPublicKeyInfo for Ed25519: fixed prefix, then the 32-byte key.
            let mut der = hex::decode("302a300506032b6570032100").ok()?;
            der.extend_from_slice(&raw);
            let key = PublicKey::from_spki_der(&der).ok()?;
            Some(Key {
                identity: der,
                public: key,
            })
        }
        _ => None,
    }
}

/// OLPC canonical JSON as securesystemslib writes it: keys sorted, no whitespace, strings
/// escaping only `"` and `\`, integers only.
pub fn canonical_json(v: &Value) -> std::result::Result<Vec<u8>, String> {
    let mut out = Vec::new();
    write_canonical(v, &mut out, 0)?;
    Ok(out)
}

fn write_canonical(v: &Value, out: &mut Vec<u8>, depth: usize) -> std::result::Result<(), String> {
    if depth > 64 {
        return Err("JSON nested too deeply".into());
    }
    match v {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                out.extend_from_slice(i.to_string().as_bytes());
            } else if let Some(u) = n.as_u64() {
                out.extend_from_slice(u.to_string().as_bytes());
            } else {
                return Err(format!("{n} is not an integer (canonical JSON has none)"));
            }
        }
        Value::String(s) => write_string(s, out),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out, depth + 1)?;
            }
            out.push(b']');
        }
        Value::Object(map) => {
            // Byte order of UTF-8 is code point order, which is what securesystemslib sorts by.
            let sorted: BTreeMap<&[u8], (&String, &Value)> =
                map.iter().map(|(k, v)| (k.as_bytes(), (k, v))).collect();
            out.push(b'{');
            for (i, (k, v)) in sorted.values().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_string(k, out);
                out.push(b':');
                write_canonical(v, out, depth + 1)?;
            }
            out.push(b'}');
        }
    }
    Ok(())
}

fn write_string(s: &str, out: &mut Vec<u8>) {
    out.push(b'"');
    for b in s.bytes() {
        if b == b'"' || b == b'\\' {
            out.push(b'\\');
        }
        out.push(b);
    }
    out.push(b'"');
}

// ---------------------------------------------------------------------------------------------
// The client workflow

/// What a snapshot or timestamp records about another file.
struct MetaFile {
    version: u64,
    length: Option<u64>,
    hashes: BTreeMap<String, String>,
}

fn meta_entry(s: &Signed, name: &str) -> Result<MetaFile> {
    let m = s
        .signed
        .get("meta")
        .and_then(|m| m.get(name))
        .ok_or_else(|| malformed(&s.file, format!("meta has no {name}")))?;
    let version = m
        .get("version")
        .and_then(Value::as_u64)
        .filter(|v| *v >= 1)
        .ok_or_else(|| malformed(&s.file, format!("meta {name}: version")))?;
    let length = match m.get("length") {
        None => None,
        Some(l) => Some(
            l.as_u64()
                .ok_or_else(|| malformed(&s.file, format!("meta {name}: length")))?,
        ),
    };
    let hashes = hashes_of(m, &s.file)?;
    Ok(MetaFile {
        version,
        length,
        hashes,
    })
}

fn hashes_of(m: &Value, file: &str) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    if let Some(h) = m.get("hashes") {
        let h = h
            .as_object()
            .ok_or_else(|| malformed(file, "hashes is not an object"))?;
        for (alg, v) in h {
            let v = v
                .as_str()
                .ok_or_else(|| malformed(file, format!("hash {alg} is not text")))?;
            out.insert(alg.clone(), v.to_ascii_lowercase());
        }
    }
    Ok(out)
}

/// Checks `bytes` against a length and hashes (sha256/sha512; others are not computed).
/// `require_hash`: at least one hash must be known (targets).
fn check_file(
    file: &str,
    by: &str,
    bytes: &[u8],
    length: Option<u64>,
    hashes: &BTreeMap<String, String>,
    require_hash: bool,
) -> Result<()> {
    let mismatch = |what| Error::Mismatch {
        file: file.to_string(),
        what,
        by: by.to_string(),
    };
    if let Some(l) = length {
        if bytes.len() as u64 != l {
            return Err(mismatch("length"));
        }
    }
    let mut known = 0;
    for (alg, want) in hashes {
        let have = match alg.as_str() {
            "sha256" => hex::encode(sha2::Sha256::digest(bytes)),
            "sha512" => hex::encode(sha2::Sha512::digest(bytes)),
            _ => continue,
        };
        known += 1;
        if &have != want {
            return Err(mismatch("hash"));
        }
    }
    if require_hash && known == 0 {
        return Err(malformed(by, format!("{file}: no sha256 or sha512 hash")));
    }
    Ok(())
}

struct Client<'a> {
    repo: &'a mut dyn Fetch,
    root: Root,
    now: i64,
    previous: Option<Versions>,
    timestamp_version: u64,
    snapshot_version: u64,
    timestamp_expires: i64,
    snapshot_expires: i64,
    snapshot_meta: Option<MetaFile>,
    targets_meta: Option<MetaFile>,
    targets: Option<Signed>,
}

impl<'a> Client<'a> {
    fn new(
        repo: &'a mut dyn Fetch,
        trusted_root_json: &[u8],
        now: i64,
        previous: Option<Versions>,
    ) -> Result<Client<'a>> {
        if trusted_root_json.len() as u64 > MAX_METADATA_BYTES {
            return Err(Error::TooLarge {
                file: "trusted root".into(),
                max: MAX_METADATA_BYTES,
            });
        }
        let signed = Signed::parse("trusted root (spec root)", trusted_root_json, "root")?;
        let root = Root::from_signed(&signed)?;
        // The root the TrustRoot names must be well signed by itself, so a typo in it (or a
        // root that would never verify its own successor) is caught here.
        signed.verify_role(&root, "root")?;
        Ok(Client {
            repo,
            root,
            now,
            previous,
            timestamp_version: 0,
            snapshot_version: 0,
            timestamp_expires: 0,
            snapshot_expires: 0,
            snapshot_meta: None,
            targets_meta: None,
            targets: None,
        })
    }

    fn fetch(&mut self, file: &str, max: u64) -> Result<Option<Vec<u8>>> {
        let bytes = self.repo.fetch(file, max)?;
        if let Some(b) = &bytes {
            if b.len() as u64 > max {
                return Err(Error::TooLarge {
                    file: file.to_string(),
                    max,
                });
            }
        }
        Ok(bytes)
    }

    fn fetch_required(&mut self, file: &str, max: u64) -> Result<Vec<u8>> {
        self.fetch(file, max)?.ok_or_else(|| Error::Missing {
            file: file.to_string(),
        })
    }

    fn versions(&self) -> Versions {
        Versions {
            root: self.root.version,
            timestamp: self.timestamp_version,
            snapshot: self.snapshot_version,
            targets: self
                .targets
                .as_ref()
                .and_then(|t| t.version().ok())
                .unwrap_or(0),
        }
    }

    /// The expiry of the metadata verified by [`Client::refresh`].
    fn expiry(&self) -> Result<Expiry> {
        let targets = self
            .targets
            .as_ref()
            .ok_or_else(|| malformed("targets.json", "not verified"))?
            .expires()?;
        let (earliest_role, earliest) = [
            ("root", self.root.expires),
            ("timestamp", self.timestamp_expires),
            ("snapshot", self.snapshot_expires),
            ("targets", targets),
        ]
        .into_iter()
        .min_by_key(|(_, at)| *at)
        .unwrap_or(("timestamp", self.timestamp_expires));
        Ok(Expiry {
            timestamp: self.timestamp_expires,
            earliest,
            earliest_role,
        })
    }

    fn refresh(&mut self) -> Result<()> {
        self.update_root()?;
        self.update_timestamp()?;
        self.update_snapshot()?;
        self.update_targets()
    }

    /// §5.3: apply `N+1.root.json` while present; the final root must be unexpired.
    fn update_root(&mut self) -> Result<()> {
        for _ in 0..MAX_ROOT_ROTATIONS {
            let next = self.root.version + 1;
            let file = format!("{next}.root.json");
            let Some(bytes) = self.fetch(&file, MAX_METADATA_BYTES)? else {
                break;
            };
            let signed = Signed::parse(&file, &bytes, "root")?;
            signed.verify_role(&self.root, "root")?;
            let new = Root::from_signed(&signed)?;
            signed.verify_role(&new, "root")?;
            if new.version != next {
                return Err(Error::Version {
                    file,
                    found: new.version,
                    expected: next.to_string(),
                });
            }
            self.root = new;
        }
        if let Some(prev) = self.previous {
            if self.root.version < prev.root {
                return Err(Error::Version {
                    file: "root.json".into(),
                    found: self.root.version,
                    expected: format!("at least {} (trusted before)", prev.root),
                });
            }
        }
        if self.root.expires <= self.now {
            return Err(Error::Expired {
                file: format!("{}.root.json", self.root.version),
                expires: jiff::Timestamp::from_second(self.root.expires)
                    .map(|t| t.to_string())
                    .unwrap_or_default(),
            });
        }
        Ok(())
    }

    /// §5.4.
    fn update_timestamp(&mut self) -> Result<()> {
        let file = "timestamp.json";
        let bytes = self.fetch_required(file, MAX_METADATA_BYTES)?;
        let signed = Signed::parse(file, &bytes, "timestamp")?;
        signed.verify_role(&self.root, "timestamp")?;
        let version = signed.version()?;
        if let Some(prev) = self.previous {
            if version < prev.timestamp {
                return Err(Error::Version {
                    file: file.into(),
                    found: version,
                    expected: format!("at least {} (trusted before)", prev.timestamp),
                });
            }
        }
        signed.check_expiry(self.now)?;
        self.timestamp_expires = signed.expires()?;
        let snap = meta_entry(&signed, "snapshot.json")?;
        if let Some(prev) = self.previous {
            if snap.version < prev.snapshot {
                return Err(Error::Version {
                    file: "snapshot.json".into(),
                    found: snap.version,
                    expected: format!("at least {} (trusted before)", prev.snapshot),
                });
            }
        }
        self.timestamp_version = version;
        self.snapshot_version = snap.version;
        // Kept for the snapshot step.
        self.snapshot_meta = Some(snap);
        Ok(())
    }

    /// Name of a metadata file under consistent snapshots or not.
    fn meta_path(&self, version: u64, role: &str) -> String {
        if self.root.consistent_snapshot {
            format!("{version}.{role}.json")
        } else {
            format!("{role}.json")
        }
    }

    /// Fetches a metadata file `meta` describes and checks it against that record.
    fn fetch_meta(&mut self, role: &str, meta: &MetaFile, by: &str) -> Result<Signed> {
        let file = self.meta_path(meta.version, role);
        let max = meta
            .length
            .unwrap_or(MAX_METADATA_BYTES)
            .min(MAX_METADATA_BYTES);
        let bytes = self.fetch_required(&file, max)?;
        check_file(&file, by, &bytes, meta.length, &meta.hashes, false)?;
        let signed = Signed::parse(&file, &bytes, role)?;
        signed.verify_role(&self.root, role)?;
        let version = signed.version()?;
        if version != meta.version {
            return Err(Error::Version {
                file,
                found: version,
                expected: format!("{} (from {by})", meta.version),
            });
        }
        signed.check_expiry(self.now)?;
        Ok(signed)
    }

    /// §5.5.
    fn update_snapshot(&mut self) -> Result<()> {
        let meta = self
            .snapshot_meta
            .take()
            .ok_or_else(|| malformed("timestamp.json", "no snapshot record"))?;
        let snapshot = self.fetch_meta("snapshot", &meta, "timestamp.json")?;
        self.snapshot_expires = snapshot.expires()?;
        let targets = meta_entry(&snapshot, "targets.json")?;
        if let Some(prev) = self.previous {
            if targets.version < prev.targets {
                return Err(Error::Version {
                    file: "targets.json".into(),
                    found: targets.version,
                    expected: format!("at least {} (trusted before)", prev.targets),
                });
            }
        }
        self.targets_meta = Some(targets);
        Ok(())
    }

    /// §5.6.
    fn update_targets(&mut self) -> Result<()> {
        let meta = self
            .targets_meta
            .take()
            .ok_or_else(|| malformed("snapshot.json", "no targets record"))?;
        let by = self.meta_path(self.snapshot_version, "snapshot");
        self.targets = Some(self.fetch_meta("targets", &meta, &by)?);
        Ok(())
    }

    fn targets(&self) -> Result<&Value> {
        self.targets
            .as_ref()
            .and_then(|t| t.signed.get("targets"))
            .filter(|t| t.is_object())
            .ok_or_else(|| malformed("targets.json", "no targets object"))
    }

    fn delegates(&self) -> bool {
        self.targets
            .as_ref()
            .and_then(|t| t.signed.get("delegations"))
            .and_then(|d| d.get("roles"))
            .and_then(Value::as_array)
            .is_some_and(|r| !r.is_empty())
    }

    /// §5.7: a top-level target's bytes, checked by length and hashes.
    fn target(&mut self, targets_dir: &str, name: &str) -> Result<Option<Vec<u8>>> {
        let Some(info) = self.targets()?.get(name).cloned() else {
            if self.delegates() {
                return Err(Error::Delegated {
                    target: name.to_string(),
                });
            }
            return Ok(None);
        };
        let target_err = |reason: String| Error::Target {
            target: name.to_string(),
            reason,
        };
        if name
            .split('/')
            .any(|p| p.is_empty() || p == "." || p == "..")
        {
            return Err(target_err("unsafe target name".into()));
        }
        let length = info
            .get("length")
            .and_then(Value::as_u64)
            .ok_or_else(|| target_err("no length".into()))?;
        if length > MAX_TARGET_BYTES {
            return Err(Error::TooLarge {
                file: name.to_string(),
                max: MAX_TARGET_BYTES,
            });
        }
        let hashes = hashes_of(&info, "targets.json")?;
        let file = if self.root.consistent_snapshot {
            let hash = hashes
                .get("sha256")
                .or_else(|| hashes.get("sha512"))
                .ok_or_else(|| target_err("no sha256 or sha512 hash".into()))?;
            match name.rsplit_once('/') {
                Some((dir, base)) => format!("{targets_dir}/{dir}/{hash}.{base}"),
                None => format!("{targets_dir}/{hash}.{name}"),
            }
        } else {
            format!("{targets_dir}/{name}")
        };
        let bytes = self.fetch_required(&file, length)?;
        let by = self.meta_path(self.versions().targets, "targets");
        check_file(&file, &by, &bytes, Some(length), &hashes, true)?;
        Ok(Some(bytes))
    }

    /// The Sigstore trust material: the trusted root target, else legacy targets.
    fn sigstore_trust(&mut self, targets_dir: &str, trusted_root_target: &str) -> Result<TufTrust> {
        if let Some(bytes) = self.target(targets_dir, trusted_root_target)? {
            let text = std::str::from_utf8(&bytes).map_err(|_| Error::Target {
                target: trusted_root_target.to_string(),
                reason: "not UTF-8".into(),
            })?;
            return parse_trusted_root(text).map_err(|reason| Error::Target {
                target: trusted_root_target.to_string(),
                reason,
            });
        }
        self.legacy_trust(targets_dir, trusted_root_target)
    }

    /// Targets marked `custom.sigstore.usage` (Fulcio, CTFE, Rekor, TSA), as older private
    /// Sigstore TUF repositories publish them.
    fn legacy_trust(&mut self, targets_dir: &str, trusted_root_target: &str) -> Result<TufTrust> {
        let mut marked = Vec::new();
        if let Some(all) = self.targets()?.as_object() {
            for (name, info) in all {
                let custom = info.get("custom").and_then(|c| c.get("sigstore"));
                let usage = custom.and_then(|c| c.get("usage")).and_then(Value::as_str);
                if let Some(usage) = usage {
                    let uri = custom
                        .and_then(|c| c.get("uri"))
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    marked.push((name.clone(), usage.to_string(), uri.to_string()));
                }
            }
        }
        if marked.is_empty() {
            return Err(Error::NoTrustedRoot {
                target: trusted_root_target.to_string(),
            });
        }
        if marked.len() > MAX_LEGACY_TARGETS {
            return Err(malformed("targets.json", "too many Sigstore targets"));
        }
        let mut trust = TufTrust::default();
        for (name, usage, uri) in marked {
            let bytes = self
                .target(targets_dir, &name)?
                .ok_or_else(|| Error::Missing { file: name.clone() })?;
            let err = |reason: String| Error::Target {
                target: name.clone(),
                reason,
            };
            let text = std::str::from_utf8(&bytes).map_err(|_| err("not PEM text".into()))?;
            match usage.as_str() {
                "Fulcio" | "TSA" => {
                    let certs = Cert::from_pem_chain(text).map_err(err)?;
                    let ca = CertificateAuthority {
                        uri,
                        certs,
                        valid: Validity::default(),
                    };
                    if usage == "Fulcio" {
                        trust.material.fulcio.push(ca);
                    } else {
                        trust.material.timestamp_authorities.push(ca);
                    }
                }
                "CTFE" => {
                    let key = PublicKey::from_pem(text).map_err(|e| err(e.to_string()))?;
                    trust.material.ct_logs.0.push(key);
                }
                "Rekor" => {
                    let key = PublicKey::from_pem(text).map_err(|e| err(e.to_string()))?;
                    trust.tlogs.push((uri, key));
                }
                _ => {}
            }
        }
        Ok(trust)
    }
}

/// Parses a Sigstore `trusted_root.json` into trust material plus its transparency logs.
pub fn parse_trusted_root(text: &str) -> std::result::Result<TufTrust, String> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Doc {
        #[serde(default)]
        tlogs: Vec<Log>,
    }
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Log {
        #[serde(default)]
        base_url: String,
        public_key: RawBytes,
    }
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct RawBytes {
        raw_bytes: String,
    }
    let material = trust_root::parse_trusted_root(text)?;
    let doc: Doc = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let tlogs = doc
        .tlogs
        .into_iter()
        .map(|l| {
            let der = decode_b64(&l.public_key.raw_bytes)?;
            let key = PublicKey::from_spki_der(&der).map_err(|e| format!("tlog key: {e}"))?;
            Ok((l.base_url, key))
        })
        .collect::<std::result::Result<Vec<_>, String>>()?;
    Ok(TufTrust {
        material,
        tlogs,
        versions: Versions::default(),
        expires: None,
    })
}

/// The trust of a `repository` TrustRoot: everything is read from `mirrorFS` in memory.
pub fn from_repository(
    root: &str,
    mirror_fs: &str,
    targets: Option<&str>,
    trusted_root_target: Option<&str>,
    now: i64,
) -> Result<TufTrust> {
    let root = decode_root(root)?;
    let archive = decode_b64(mirror_fs).map_err(Error::Archive)?;
    let mut repo = MemoryRepo::from_tar_gz(&archive)?;
    update(
        &mut repo,
        &root,
        targets_dir(targets),
        trusted_root_target
            .filter(|t| !t.is_empty())
            .unwrap_or(DEFAULT_TRUSTED_ROOT_TARGET),
        now,
        None,
    )
}

/// The targets directory, `targets` unless the TrustRoot names another.
pub fn targets_dir(targets: Option<&str>) -> &str {
    targets
        .map(|t| t.trim_matches('/'))
        .filter(|t| !t.is_empty())
        .unwrap_or("targets")
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::pkcs8::EncodePublicKey as _;
    use serde_json::json;

    const TRUSTED_ROOT: &str = include_str!("data/trusted_root.json");
    const FUTURE: &str = "2100-01-01T00:00:00Z";
    const NOW: i64 = 1_800_000_000;

    enum K {
        P256(p256::ecdsa::SigningKey),
        Ed(ed25519_dalek::SigningKey),
    }

    impl K {
        fn p256(seed: u8) -> K {
            K::P256(p256::ecdsa::SigningKey::from_bytes(&[seed; 32].into()).unwrap())
        }
        fn ed(seed: u8) -> K {
            K::Ed(ed25519_dalek::SigningKey::from_bytes(&[seed; 32]))
        }
        fn json(&self) -> Value {
            match self {
                K::P256(k) => json!({"keytype": "ecdsa", "scheme": "ecdsa-sha2-nistp256",
                    "keyval": {"public": k.verifying_key().to_public_key_pem(p256::pkcs8::LineEnding::LF).unwrap()}}),
                K::Ed(k) => json!({"keytype": "ed25519", "scheme": "ed25519",
                    "keyval": {"public": hex::encode(k.verifying_key().to_bytes())}}),
            }
        }
        fn id(&self) -> String {
            hex::encode(sha2::Sha256::digest(canonical_json(&self.json()).unwrap()))
        }
        fn sign(&self, msg: &[u8]) -> String {
            use ed25519_dalek::Signer as _;
            match self {
                K::P256(k) => {
                    let sig: p256::ecdsa::Signature = p256::ecdsa::signature::Signer::sign(k, msg);
                    hex::encode(sig.to_der().as_bytes())
                }
                K::Ed(k) => hex::encode(k.sign(msg).to_bytes()),
            }
        }
    }

    fn doc(signed: Value, signers: &[&K]) -> Vec<u8> {
        let canonical = canonical_json(&signed).unwrap();
        let signatures: Vec<Value> = signers
            .iter()
            .map(|k| json!({"keyid": k.id(), "sig": k.sign(&canonical)}))
            .collect();
        serde_json::to_vec_pretty(&json!({"signed": signed, "signatures": signatures})).unwrap()
    }

    fn root(
        version: u64,
        root_keys: &[&K],
        threshold: u64,
        others: &[&K; 3],
        consistent: bool,
    ) -> Value {
        let mut keys = serde_json::Map::new();
        for k in root_keys.iter().chain(others.iter()) {
            keys.insert(k.id(), k.json());
        }
        let role = |ks: &[&K], t: u64| json!({"keyids": ks.iter().map(|k| k.id()).collect::<Vec<_>>(), "threshold": t});
        json!({"_type": "root", "spec_version": "1.0", "version": version, "expires": FUTURE,
            "consistent_snapshot": consistent, "keys": keys,
            "roles": {"root": role(root_keys, threshold), "timestamp": role(&[others[0]], 1),
                      "snapshot": role(&[others[1]], 1), "targets": role(&[others[2]], 1)}})
    }

    /// The public-good trusted root plus a transparency log.
    fn trusted_root_with_tlog() -> Vec<u8> {
        let mut v: Value = serde_json::from_str(TRUSTED_ROOT).unwrap();
        let K::P256(k) = K::p256(30) else {
            unreachable!()
        };
        let der = k.verifying_key().to_public_key_der().unwrap();
        v["tlogs"] = json!([{"baseUrl": "https://rekor.sigstore.dev",
            "publicKey": {"rawBytes": base64::engine::general_purpose::STANDARD.encode(der.as_bytes())}}]);
        serde_json::to_vec(&v).unwrap()
    }

    /// A repository to alter before it is built.
    struct Fixture {
        root_keys: Vec<K>,
        roles: [K; 3],
        consistent: bool,
        timestamp_expires: &'static str,
        target: Vec<u8>,
        tamper_target: bool,
        targets_signed_by_wrong_key: bool,
        delegate: bool,
    }

    impl Fixture {
        fn new() -> Fixture {
            Fixture {
                root_keys: vec![K::p256(1), K::ed(2)],
                roles: [K::p256(3), K::ed(4), K::p256(5)],
                consistent: true,
                timestamp_expires: FUTURE,
                target: trusted_root_with_tlog(),
                tamper_target: false,
                targets_signed_by_wrong_key: false,
                delegate: false,
            }
        }

        fn others(&self) -> [&K; 3] {
            [&self.roles[0], &self.roles[1], &self.roles[2]]
        }

        fn root1(&self) -> Vec<u8> {
            let rk: Vec<&K> = self.root_keys.iter().collect();
            doc(root(1, &rk, 2, &self.others(), self.consistent), &rk)
        }

        fn build(&self) -> MemoryRepo {
            let mut files = HashMap::new();
            let sha256 = hex::encode(sha2::Sha256::digest(&self.target));
            let mut targets = json!({"_type": "targets", "spec_version": "1.0", "version": 3,
                "expires": FUTURE, "targets": {"trusted_root.json": {"length": self.target.len(),
                "hashes": {"sha256": sha256, "sha512": hex::encode(sha2::Sha512::digest(&self.target))}}}});
            if self.delegate {
                targets["targets"] = json!({});
                targets["delegations"] = json!({"keys": {}, "roles": [{"name": "sub", "keyids": [], "threshold": 1, "paths": ["*"], "terminating": true}]});
            }
            let wrong = K::p256(9);
            let signer = if self.targets_signed_by_wrong_key {
                &wrong
            } else {
                &self.roles[2]
            };
            let targets = doc(targets, &[signer]);
            let snapshot = doc(
                json!({"_type": "snapshot", "spec_version": "1.0", "version": 7, "expires": FUTURE,
                "meta": {"targets.json": {"version": 3, "length": targets.len(),
                "hashes": {"sha256": hex::encode(sha2::Sha256::digest(&targets))}}}}),
                &[&self.roles[1]],
            );
            let timestamp = doc(
                json!({"_type": "timestamp", "spec_version": "1.0", "version": 11,
                "expires": self.timestamp_expires, "meta": {"snapshot.json": {"version": 7,
                "hashes": {"sha256": hex::encode(sha2::Sha256::digest(&snapshot))}}}}),
                &[&self.roles[0]],
            );
            let mut target = self.target.clone();
            if self.tamper_target {
                target[0] ^= 1;
            }
            if self.consistent {
                files.insert("3.targets.json".to_string(), targets);
                files.insert("7.snapshot.json".to_string(), snapshot);
                files.insert(format!("targets/{sha256}.trusted_root.json"), target);
            } else {
                files.insert("targets.json".to_string(), targets);
                files.insert("snapshot.json".to_string(), snapshot);
                files.insert("targets/trusted_root.json".to_string(), target);
            }
            files.insert("timestamp.json".to_string(), timestamp);
            files.insert("1.root.json".to_string(), self.root1());
            MemoryRepo { files }
        }

        fn run(&self, repo: &mut MemoryRepo) -> Result<TufTrust> {
            update(
                repo,
                &self.root1(),
                "targets",
                DEFAULT_TRUSTED_ROOT_TARGET,
                NOW,
                None,
            )
        }
    }

    #[test]
    fn verified_repository_yields_the_trusted_root() {
        for consistent in [true, false] {
            let mut f = Fixture::new();
            f.consistent = consistent;
            let trust = f.run(&mut f.build()).unwrap();
            assert_eq!(trust.material, trust_root::public_good().unwrap());
            assert_eq!(trust.tlogs.len(), 1);
            assert_eq!(trust.tlogs[0].0, "https://rekor.sigstore.dev");
            assert_eq!(
                trust.versions,
                Versions {
                    root: 1,
                    timestamp: 11,
                    snapshot: 7,
                    targets: 3
                }
            );
        }
    }

    #[test]
    fn tampered_target_expired_timestamp_and_bad_signatures_fail() {
        let mut f = Fixture::new();
        f.tamper_target = true;
        let e = f.run(&mut f.build()).unwrap_err();
        assert!(matches!(e, Error::Mismatch { what: "hash", .. }), "{e}");
        assert!(
            e.to_string().contains(
                "trusted_root.json: hash does not match the one recorded in 3.targets.json"
            ),
            "{e}"
        );

        let mut f = Fixture::new();
        f.timestamp_expires = "2020-01-01T00:00:00Z";
        let e = f.run(&mut f.build()).unwrap_err().to_string();
        assert_eq!(e, "timestamp.json: expired at 2020-01-01T00:00:00Z");

        let mut f = Fixture::new();
        f.targets_signed_by_wrong_key = true;
        let e = f.run(&mut f.build()).unwrap_err().to_string();
        assert_eq!(
            e,
            "3.targets.json: 0 valid signature(s) from the targets role, 1 required"
        );

        // The root from the TrustRoot needs 2 of its keys; one signature is below threshold.
        let f = Fixture::new();
        let rk: Vec<&K> = f.root_keys.iter().collect();
        let half = doc(root(1, &rk, 2, &f.others(), true), &[rk[0]]);
        let e = update(
            &mut f.build(),
            &half,
            "targets",
            DEFAULT_TRUSTED_ROOT_TARGET,
            NOW,
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("1 valid signature(s) from the root role, 2 required"),
            "{e}"
        );

        // The same key twice (two ids, one key) counts once.
        let mut signed: Value = serde_json::from_slice(&f.root1()).unwrap();
        let sig = signed["signatures"][0].clone();
        signed["signatures"] = json!([sig.clone(), sig]);
        let e = update(
            &mut f.build(),
            &serde_json::to_vec(&signed).unwrap(),
            "targets",
            DEFAULT_TRUSTED_ROOT_TARGET,
            NOW,
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("1 valid signature(s)"), "{e}");
    }

    #[test]
    fn one_key_under_two_encodings_counts_once() {
        use base64::Engine as _;
        let f = Fixture::new();
        let key = p256::ecdsa::SigningKey::from_bytes(&[31; 32].into()).unwrap();
        // The same point, as an uncompressed and as a compressed SubjectPublicKeyInfo.
        let uncompressed = key
            .verifying_key()
            .to_public_key_pem(p256::pkcs8::LineEnding::LF)
            .unwrap();
        let mut der = hex::decode("3039301306072a8648ce3d020106082a8648ce3d030107032200").unwrap();
        der.extend_from_slice(key.verifying_key().to_encoded_point(true).as_bytes());
        let compressed = format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            base64::engine::general_purpose::STANDARD.encode(&der)
        );
        assert!(
            PublicKey::from_pem(&compressed).is_ok(),
            "both encodings parse"
        );
        let entry = |pem: &str| json!({"keytype": "ecdsa", "scheme": "ecdsa-sha2-nistp256", "keyval": {"public": pem}});
        let id = |v: &Value| hex::encode(sha2::Sha256::digest(canonical_json(v).unwrap()));
        let (a, b) = (entry(&uncompressed), entry(&compressed));
        let (id_a, id_b) = (id(&a), id(&b));
        assert_ne!(id_a, id_b);
        let mut signed = root(1, &[], 2, &f.others(), true);
        signed["keys"][&id_a] = a;
        signed["keys"][&id_b] = b;
        signed["roles"]["root"] = json!({"keyids": [id_a, id_b], "threshold": 2});
        let canonical = canonical_json(&signed).unwrap();
        let sign = || {
            let sig: p256::ecdsa::Signature =
                p256::ecdsa::signature::Signer::sign(&key, &canonical);
            hex::encode(sig.to_der().as_bytes())
        };
        let trusted = serde_json::to_vec(&json!({"signed": signed, "signatures": [
            {"keyid": id_a, "sig": sign()}, {"keyid": id_b, "sig": sign()}]}))
        .unwrap();
        let e = update(
            &mut f.build(),
            &trusted,
            "targets",
            DEFAULT_TRUSTED_ROOT_TARGET,
            NOW,
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("1 valid signature(s) from the root role, 2 required"),
            "{e}"
        );
    }

    #[test]
    fn verified_trust_records_the_earliest_expiry() {
        let mut f = Fixture::new();
        f.timestamp_expires = "2030-01-01T00:00:00Z";
        let trust = f.run(&mut f.build()).unwrap();
        let expiry = trust.expires.unwrap();
        let at: jiff::Timestamp = "2030-01-01T00:00:00Z".parse().unwrap();
        assert_eq!(expiry.timestamp, at.as_second());
        assert_eq!(expiry.earliest, at.as_second());
        assert_eq!(expiry.earliest_role, "timestamp");
        assert!(!expiry.expired(NOW));
        assert!(expiry.expired(at.as_second()));
        assert_eq!(expiry.describe(), "2030-01-01T00:00:00Z (timestamp.json)");
    }

    #[test]
    fn root_rotation_needs_old_and_new_keys() {
        let f = Fixture::new();
        let new_keys = [K::p256(21), K::ed(22)];
        let new: Vec<&K> = new_keys.iter().collect();
        let old: Vec<&K> = f.root_keys.iter().collect();
        let two = root(2, &new, 2, &f.others(), true);

        let mut repo = f.build();
        let both: Vec<&K> = old.iter().chain(new.iter()).copied().collect();
        repo.files
            .insert("2.root.json".into(), doc(two.clone(), &both));
        assert_eq!(f.run(&mut repo).unwrap().versions.root, 2);

        let mut repo = f.build();
        repo.files
            .insert("2.root.json".into(), doc(two.clone(), &new));
        let e = f.run(&mut repo).unwrap_err().to_string();
        assert_eq!(
            e,
            "2.root.json: 0 valid signature(s) from the root role, 2 required"
        );

        // Signed by the old keys only: the new root does not vouch for itself.
        let mut repo = f.build();
        repo.files
            .insert("2.root.json".into(), doc(two.clone(), &old));
        let e = f.run(&mut repo).unwrap_err().to_string();
        assert_eq!(
            e,
            "2.root.json: 0 valid signature(s) from the root role, 2 required"
        );

        // A version that does not follow is refused.
        let mut repo = f.build();
        repo.files.insert(
            "2.root.json".into(),
            doc(root(3, &new, 2, &f.others(), true), &both),
        );
        let e = f.run(&mut repo).unwrap_err().to_string();
        assert_eq!(e, "2.root.json: version 3, expected 2");
    }

    #[test]
    fn rollback_delegation_and_garbage_are_errors() {
        let f = Fixture::new();
        let prev = Versions {
            root: 1,
            timestamp: 12,
            snapshot: 7,
            targets: 3,
        };
        let e = update(
            &mut f.build(),
            &f.root1(),
            "targets",
            DEFAULT_TRUSTED_ROOT_TARGET,
            NOW,
            Some(prev),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            "timestamp.json: version 11, expected at least 12 (trusted before)"
        );

        let mut f = Fixture::new();
        f.delegate = true;
        let e = f.run(&mut f.build()).unwrap_err();
        assert!(matches!(e, Error::Delegated { .. }), "{e}");

        let f = Fixture::new();
        let e = update(
            &mut f.build(),
            &f.root1(),
            "targets",
            "other.json",
            NOW,
            None,
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "the repository has no target \"other.json\" and no legacy Sigstore targets"
        );

        let mut repo = f.build();
        repo.files
            .insert("timestamp.json".into(), b"{\"signed\": 1}".to_vec());
        let e = f.run(&mut repo).unwrap_err().to_string();
        assert!(e.starts_with("timestamp.json: malformed"), "{e}");
        repo.files.remove("timestamp.json");
        let e = f.run(&mut repo).unwrap_err().to_string();
        assert_eq!(e, "timestamp.json: not found in the TUF repository");
        assert!(update(&mut f.build(), b"[]", "targets", "x", NOW, None).is_err());
        assert!(MemoryRepo::from_tar_gz(b"not gzip").is_err());
        assert_eq!(
            normalize("./repository/targets/a"),
            Some("targets/a".into())
        );
        assert_eq!(normalize("repository/../etc/passwd"), None);
    }

    #[test]
    fn canonical_json_is_olpc() {
        let v: Value =
            serde_json::from_str(r#"{"b": [1, -2, true, null], "a": "q\"\\\n", "é": {}}"#).unwrap();
        assert_eq!(
            String::from_utf8(canonical_json(&v).unwrap()).unwrap(),
            "{\"a\":\"q\\\"\\\\\n\",\"b\":[1,-2,true,null],\"é\":{}}"
        );
        assert!(canonical_json(&json!({"f": 1.5})).is_err());
    }
}
