//! Rekor v2 evidence: a log entry with an inclusion proof up to a signed checkpoint, and no
//! inclusion promise or integrated time. The log is made here: a log key in a TrustRoot's
//! `tLogs`, a Merkle tree of several entries (RFC 6962 §2.1, hand-written fixture code), a
//! checkpoint in the signed-note format. Bundles carrying v2 entries are attached to images in
//! the real registry and judged by `pullgate verify`, as in `tests/bundles.rs`.

mod common;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use common::fulcio::{Leaf, TestFulcio};
use common::tsa::TestTsa;
use common::*;
use serde_json::{json, Value};
use sha2::Digest as _;

const BUNDLE: &str = "application/vnd.dev.sigstore.bundle.v0.3+json";
const EMPTY: &str = "application/vnd.oci.empty.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const IN_TOTO: &str = "application/vnd.in-toto+json";
const SIGN: &str = "https://sigstore.dev/cosign/sign/v1";
const ISSUER: &str = "https://token.actions.githubusercontent.com";
const WORKFLOW: &str = "https://github.com/acme/app/.github/workflows/release.yml@refs/heads/main";
const LOG_URL: &str = "https://rekor-v2.test";
const ORIGIN: &str = "rekor-v2.test";

fn sha256(data: &[u8]) -> [u8; 32] {
    sha2::Sha256::digest(data).into()
}

// ---- RFC 6962 §2.1 Merkle tree (test fixture) ----

fn leaf_hash(body: &[u8]) -> [u8; 32] {
    sha256(&[&[0u8][..], body].concat())
}

fn node_hash(left: &[u8; 32], right: &[u8; 32]) -> [u8; 32] {
    sha256(&[&[1u8][..], left, right].concat())
}

/// The largest power of two smaller than `n` (n > 1).
fn split(n: usize) -> usize {
    let mut k = 1;
    while k * 2 < n {
        k *= 2;
    }
    k
}

/// MTH(D[n]).
fn root(leaves: &[Vec<u8>]) -> [u8; 32] {
    match leaves.len() {
        0 => sha256(b""),
        1 => leaf_hash(&leaves[0]),
        n => {
            let k = split(n);
            node_hash(&root(&leaves[..k]), &root(&leaves[k..]))
        }
    }
}

/// PATH(m, D[n]): the audit path of leaf `m`, from the leaf up.
fn path(m: usize, leaves: &[Vec<u8>]) -> Vec<[u8; 32]> {
    let n = leaves.len();
    if n <= 1 {
        return Vec::new();
    }
    let k = split(n);
    if m < k {
        let mut p = path(m, &leaves[..k]);
        p.push(root(&leaves[k..]));
        p
    } else {
        let mut p = path(m - k, &leaves[k..]);
        p.push(root(&leaves[..k]));
        p
    }
}

// ---- the log ----

/// A Rekor v2 log: its key, and the key ID its checkpoints and entries name it by (C2SP
/// signed-note: SHA-256 of origin, newline, 0x01 and the raw Ed25519 key; 0xff and the DER key
/// for ECDSA).
struct TestLog {
    key: TestKey,
    origin: String,
}

impl TestLog {
    fn new(kind: KeyKind) -> TestLog {
        TestLog {
            key: TestKey::generate(kind),
            origin: ORIGIN.to_string(),
        }
    }

    fn key_id(&self) -> [u8; 32] {
        key_id(&self.origin, &self.key)
    }

    /// A TrustRoot listing this log (and, when given, a Fulcio CA and a timestamp authority).
    fn trust_root(&self, name: &str) -> String {
        format!(
            "---\napiVersion: policy.sigstore.dev/v1alpha1\nkind: TrustRoot\nmetadata: {{name: {name}}}\nspec:\n  sigstoreKeys:\n    tLogs:\n    - baseURL: {LOG_URL}\n      hashAlgorithm: sha-256\n      publicKey: {}\n",
            B64.encode(self.key.public_pem())
        )
    }
}

fn key_id(origin: &str, key: &TestKey) -> [u8; 32] {
    let der = key.public_der();
    let mut data = format!("{origin}\n").into_bytes();
    if key.kind() == KeyKind::Ed25519 {
        data.push(0x01);
        data.extend_from_slice(&der[der.len() - 32..]);
    } else {
        data.push(0xff);
        data.extend_from_slice(&der);
    }
    sha256(&data)
}

/// A checkpoint (signed note) for a tree of `size` with `root`, whose first line is `origin`,
/// signed by `signer` under the key hint `hint`.
fn checkpoint(origin: &str, size: usize, root: &[u8; 32], signer: &TestKey, hint: &[u8]) -> String {
    let text = format!("{origin}\n{size}\n{}\n", B64.encode(root));
    let sig = signer.sign(text.as_bytes());
    let line = B64.encode([&hint[..4], &sig[..]].concat());
    format!("{text}\n\u{2014} {origin} {line}\n")
}

/// A `dsse` v0.0.2 entry body, as Rekor v2 canonicalizes it: the payload's SHA-256 and the
/// signature with its verifier (a key or a certificate, DER).
fn dsse_body(payload: &[u8], sig: &[u8], verifier: &Verifier) -> Vec<u8> {
    let verifier = match verifier {
        Verifier::Key(der) => {
            json!({"publicKey": {"rawBytes": B64.encode(der)}, "keyDetails": "PKIX_ECDSA_P256_SHA_256"})
        }
        Verifier::Certificate(der) => {
            json!({"x509Certificate": {"rawBytes": B64.encode(der)}, "keyDetails": "PKIX_ECDSA_P256_SHA_256"})
        }
    };
    serde_json::to_vec(&json!({
        "apiVersion": "0.0.2",
        "kind": "dsse",
        "spec": {"dsseV002": {
            "payloadHash": {"algorithm": "SHA2_256", "digest": B64.encode(sha256(payload))},
            "signatures": [{"content": B64.encode(sig), "verifier": verifier}],
        }},
    }))
    .unwrap()
}

enum Verifier {
    Key(Vec<u8>),
    Certificate(Vec<u8>),
}

/// Other entries of the log, around the one under test.
fn filler(n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| format!("{{\"other entry\":{i}}}").into_bytes())
        .collect()
}

/// How a v2 entry is built (each field a way of breaking it).
struct Entry<'a> {
    log: &'a TestLog,
    /// Every leaf of the tree; the entry's body is `leaves[index]`.
    leaves: Vec<Vec<u8>>,
    index: usize,
    /// The audit path of this leaf instead of `index`'s.
    path_of: Option<usize>,
    /// Replaces the proof's `rootHash` (the checkpoint keeps the true root).
    proof_root: Option<[u8; 32]>,
    /// Replaces the root the checkpoint states (and signs).
    checkpoint_root: Option<[u8; 32]>,
    signer: Option<&'a TestKey>,
    origin: Option<&'a str>,
}

impl<'a> Entry<'a> {
    fn new(log: &'a TestLog, leaves: Vec<Vec<u8>>, index: usize) -> Self {
        Entry {
            log,
            leaves,
            index,
            path_of: None,
            proof_root: None,
            checkpoint_root: None,
            signer: None,
            origin: None,
        }
    }

    /// The bundle's `tlogEntries[]` element.
    fn json(&self) -> Value {
        let size = self.leaves.len();
        let true_root = root(&self.leaves);
        let hashes: Vec<String> = path(self.path_of.unwrap_or(self.index), &self.leaves)
            .iter()
            .map(|h| B64.encode(h))
            .collect();
        let id = self.log.key_id();
        let note = checkpoint(
            self.origin.unwrap_or(&self.log.origin),
            size,
            &self.checkpoint_root.unwrap_or(true_root),
            self.signer.unwrap_or(&self.log.key),
            &id,
        );
        json!({
            "logIndex": self.index.to_string(),
            "logId": {"keyId": B64.encode(id)},
            "kindVersion": {"kind": "dsse", "version": "0.0.2"},
            "inclusionProof": {
                "logIndex": self.index.to_string(),
                "rootHash": B64.encode(self.proof_root.unwrap_or(true_root)),
                "treeSize": size.to_string(),
                "hashes": hashes,
                "checkpoint": {"envelope": note},
            },
            "canonicalizedBody": B64.encode(&self.leaves[self.index]),
        })
    }
}

// ---- bundles and images (as in tests/bundles.rs) ----

fn statement(digest: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [{"digest": {"sha256": digest.trim_start_matches("sha256:")}}],
        "predicateType": SIGN,
        "predicate": {},
    }))
    .unwrap()
}

fn envelope(payload: &[u8], key: &TestKey) -> (Value, Vec<u8>) {
    let sig = key.sign(&dsse_pae(IN_TOTO, payload));
    let env = json!({
        "payload": B64.encode(payload),
        "payloadType": IN_TOTO,
        "signatures": [{"sig": B64.encode(&sig), "keyid": ""}],
    });
    (env, sig)
}

fn bundle(envelope: Value, material: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "mediaType": BUNDLE,
        "verificationMaterial": material,
        "dsseEnvelope": envelope,
    }))
    .unwrap()
}

fn pem_der(pem: &str) -> Vec<u8> {
    let body: String = pem
        .split("-----BEGIN CERTIFICATE-----")
        .nth(1)
        .unwrap()
        .split("-----END CERTIFICATE-----")
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    B64.decode(body).unwrap()
}

/// Attaches `blob` to `REPO@DIGEST` through the referrers tag index, as cosign v3 does against
/// a registry without a referrers API.
async fn attach(reg: &Registry, repo: &str, digest: &str, blob: &[u8]) {
    let image = reg.manifest_bytes(repo, digest).await.expect("manifest");
    let config = reg.push_blob(repo, b"{}").await;
    let layer = reg.push_blob(repo, blob).await;
    let annotations = json!({
        "dev.sigstore.bundle.content": "dsse-envelope",
        "dev.sigstore.bundle.predicateType": SIGN,
    });
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": BUNDLE,
        "config": {"mediaType": EMPTY, "digest": config, "size": 2},
        "layers": [{"mediaType": BUNDLE, "digest": layer, "size": blob.len()}],
        "subject": {"mediaType": media_type_of(&image), "digest": digest, "size": image.len()},
        "annotations": annotations,
    }))
    .unwrap();
    let manifest_digest = format!("sha256:{}", hex::encode(sha256(&manifest)));
    reg.push_manifest_bytes(repo, &manifest_digest, OCI_MANIFEST, &manifest)
        .await;
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{
            "mediaType": OCI_MANIFEST,
            "digest": manifest_digest,
            "size": manifest.len(),
            "artifactType": BUNDLE,
            "annotations": annotations,
        }],
    }))
    .unwrap();
    reg.push_manifest_bytes(repo, &digest.replace(':', "-"), OCI_INDEX, &index)
        .await;
}

fn cip(glob: &str, authority: &str) -> String {
    format!(
        "---\napiVersion: policy.sigstore.dev/v1beta1\nkind: ClusterImagePolicy\nmetadata: {{name: v2}}\nspec:\n  images: [{{glob: \"{glob}\"}}]\n  authorities:\n  - name: v2\n{authority}"
    )
}

/// A key authority with `ctlog` on the test log's TrustRoot.
fn key_policy(glob: &str, key: &TestKey) -> String {
    cip(
        glob,
        &format!(
            "    signatureFormat: bundle\n    key: {{data: {}}}\n    ctlog: {{trustRootRef: v2log}}\n",
            serde_json::to_string(&key.public_pem()).unwrap()
        ),
    )
}

/// The body a key signature of `stmt` logs, with the envelope and raw signature.
fn key_signed(stmt: &[u8], key: &TestKey) -> (Value, Vec<u8>, Vec<u8>) {
    let (env, sig) = envelope(stmt, key);
    let body = dsse_body(stmt, &sig, &Verifier::Key(key.public_der()));
    (env, sig, body)
}

/// Tree leaves with `body` at `index` among `size` entries.
fn leaves_with(body: Vec<u8>, index: usize, size: usize) -> Vec<Vec<u8>> {
    let mut leaves = filler(size);
    leaves[index] = body;
    leaves
}

/// Every way of breaking a key-signed bundle's v2 entry, each on its own image, each judged by
/// an authority whose `ctlog` names the test log: only the valid ones are allowed, and each
/// denial names what failed.
#[tokio::test(flavor = "multi_thread")]
async fn rekor_v2_entries_are_ctlog_evidence_only_when_their_proof_holds() {
    let reg = Registry::start().await;
    let key = TestKey::generate(KeyKind::EcdsaP256);
    let log = TestLog::new(KeyKind::Ed25519);
    let other_key = TestKey::generate(KeyKind::Ed25519);
    let glob = format!("{}/**", reg.addr());
    let files_for =
        |policy: String| vec![("tr.yaml", log.trust_root("v2log")), ("cip.yaml", policy)];
    let policy = key_policy(&glob, &key);

    // (repo, expected reason or None for allowed, how the entry is built)
    type Build<'a> = Box<dyn Fn(&[u8], &str) -> Option<Value> + 'a>;
    let cases: Vec<(&str, Option<&str>, Build)> = vec![
        (
            "valid",
            None,
            Box::new(|body, _| Some(Entry::new(&log, leaves_with(body.to_vec(), 3, 7), 3).json())),
        ),
        (
            "size-one",
            None,
            Box::new(|body, _| Some(Entry::new(&log, vec![body.to_vec()], 0).json())),
        ),
        (
            "last-of-seven",
            None,
            Box::new(|body, _| Some(Entry::new(&log, leaves_with(body.to_vec(), 6, 7), 6).json())),
        ),
        (
            "other-entrys-proof",
            Some("Rekor v2 inclusion proof: entry 3 does not lead to the root"),
            Box::new(|body, _| {
                let mut e = Entry::new(&log, leaves_with(body.to_vec(), 3, 7), 3);
                e.path_of = Some(2);
                Some(e.json())
            }),
        ),
        (
            "proof-root-tampered",
            Some("Rekor v2 inclusion proof: its rootHash differs from the checkpoint's root"),
            Box::new(|body, _| {
                let mut e = Entry::new(&log, leaves_with(body.to_vec(), 3, 7), 3);
                e.proof_root = Some([7; 32]);
                Some(e.json())
            }),
        ),
        (
            "checkpoint-root-tampered",
            Some("Rekor v2 inclusion proof: entry 3 does not lead to the root"),
            Box::new(|body, _| {
                // The log signs a checkpoint for another tree: the proof cannot reach it.
                let mut e = Entry::new(&log, leaves_with(body.to_vec(), 3, 7), 3);
                e.checkpoint_root = Some([7; 32]);
                e.proof_root = Some([7; 32]);
                Some(e.json())
            }),
        ),
        (
            "checkpoint-edited",
            Some("Rekor v2 checkpoint: not signed by the key of log rekor-v2.test"),
            Box::new(|body, _| {
                // The root line edited after the log signed the note.
                let e = Entry::new(&log, leaves_with(body.to_vec(), 3, 7), 3);
                let mut v = e.json();
                let note = v["inclusionProof"]["checkpoint"]["envelope"]
                    .as_str()
                    .unwrap()
                    .to_string();
                let lines: Vec<&str> = note.split('\n').collect();
                let forged = note.replacen(lines[2], &B64.encode([7u8; 32]), 1);
                v["inclusionProof"]["checkpoint"]["envelope"] = forged.into();
                v["inclusionProof"]["rootHash"] = B64.encode([7u8; 32]).into();
                Some(v)
            }),
        ),
        (
            "signed-by-another-key",
            Some("Rekor v2 checkpoint: not signed by the key of log rekor-v2.test"),
            Box::new(|body, _| {
                let mut e = Entry::new(&log, leaves_with(body.to_vec(), 3, 7), 3);
                e.signer = Some(&other_key);
                Some(e.json())
            }),
        ),
        (
            "origin-of-another-log",
            Some("Rekor v2 checkpoint: its origin \\\"rekor-v2.other\\\" is not the log's"),
            Box::new(|body, _| {
                let mut e = Entry::new(&log, leaves_with(body.to_vec(), 3, 7), 3);
                e.origin = Some("rekor-v2.other");
                Some(e.json())
            }),
        ),
        (
            "another-payload",
            Some("the log entry does not match this bundle: payload hash differs"),
            Box::new(|_, digest| {
                // A valid entry, properly logged, of another statement signed by the same key.
                let other = statement(&digest.replace("sha256:", "sha256:0"));
                let (_, _, body) = key_signed(&other, &key);
                Some(Entry::new(&log, leaves_with(body, 3, 7), 3).json())
            }),
        ),
        (
            "hashedrekord-entry",
            Some("ctlog: a hashedrekord entry cannot log a DSSE envelope"),
            Box::new(|body, _| {
                // A message-signature entry, validly logged, offered for a DSSE envelope.
                let logged: Value = serde_json::from_slice(body).unwrap();
                let sig = &logged["spec"]["dsseV002"]["signatures"][0];
                let hashed = serde_json::to_vec(&json!({
                    "apiVersion": "0.0.2",
                    "kind": "hashedrekord",
                    "spec": {"hashedRekordV002": {
                        "data": logged["spec"]["dsseV002"]["payloadHash"],
                        "signature": sig,
                    }},
                }))
                .unwrap();
                let mut v = Entry::new(&log, leaves_with(hashed, 3, 7), 3).json();
                v["kindVersion"]["kind"] = "hashedrekord".into();
                Some(v)
            }),
        ),
        (
            "no-entry",
            Some("ctlog is required but the bundle has no transparency log entry"),
            Box::new(|_, _| None),
        ),
    ];
    for (repo, want, build) in &cases {
        let digest = reg
            .push_image(repo, "v1", &format!("rekor-v2-{repo}"))
            .await;
        let stmt = statement(&digest);
        let (env, _, body) = key_signed(&stmt, &key);
        let mut material = json!({"publicKey": {"hint": "k"}});
        if let Some(entry) = build(&body, &digest) {
            material["tlogEntries"] = json!([entry]);
        }
        attach(&reg, repo, &digest, &bundle(env, material)).await;
        let files = files_for(policy.clone());
        let files: Vec<(&str, &str)> = files.iter().map(|(n, c)| (*n, c.as_str())).collect();
        let v = verify_json(&files, &reg.tag_ref(repo, "v1"), &[]).await;
        match want {
            None => {
                assert_allowed(&v);
                let tlog = &v.json["policies"][0]["authorities"][0]["evidence"]["tlog"];
                assert_eq!(tlog["log_id"], hex::encode(log.key_id()), "{repo}: {tlog}");
                assert!(tlog["tree_size"].as_u64().is_some(), "{repo}: {tlog}");
                assert!(tlog.get("integrated_time").is_none(), "{repo}: {tlog}");
            }
            Some(reason) => {
                assert_denied(&v, reason);
            }
        }
    }

    // A log the TrustRoot does not list (same key, other URL): its entries are not evidence.
    let digest = reg
        .push_image("unknown-log", "v1", "rekor-v2-unknown")
        .await;
    let stmt = statement(&digest);
    let (env, _, body) = key_signed(&stmt, &key);
    let stranger = TestLog {
        key: TestKey::generate(KeyKind::Ed25519),
        origin: ORIGIN.into(),
    };
    let entry = Entry::new(&stranger, leaves_with(body, 1, 3), 1).json();
    attach(
        &reg,
        "unknown-log",
        &digest,
        &bundle(
            env,
            json!({"publicKey": {"hint": "k"}, "tlogEntries": [entry]}),
        ),
    )
    .await;
    let files = files_for(policy.clone());
    let files: Vec<(&str, &str)> = files.iter().map(|(n, c)| (*n, c.as_str())).collect();
    let v = verify_json(&files, &reg.tag_ref("unknown-log", "v1"), &[]).await;
    assert_denied(&v, "which is not a trusted transparency log");
}

/// A log with an ECDSA P-256 key (Rekor v2 logs may use either).
#[tokio::test(flavor = "multi_thread")]
async fn rekor_v2_with_an_ecdsa_log_key() {
    let reg = Registry::start().await;
    let key = TestKey::generate(KeyKind::EcdsaP256);
    let log = TestLog::new(KeyKind::EcdsaP256);
    let glob = format!("{}/**", reg.addr());
    let digest = reg.push_image("ecdsa", "v1", "rekor-v2-ecdsa").await;
    let stmt = statement(&digest);
    let (env, _, body) = key_signed(&stmt, &key);
    let entry = Entry::new(&log, leaves_with(body, 4, 5), 4).json();
    attach(
        &reg,
        "ecdsa",
        &digest,
        &bundle(
            env,
            json!({"publicKey": {"hint": "k"}, "tlogEntries": [entry]}),
        ),
    )
    .await;
    let tr = log.trust_root("v2log");
    let policy = key_policy(&glob, &key);
    let v = verify_json(
        &[("tr.yaml", &tr), ("cip.yaml", &policy)],
        &reg.tag_ref("ecdsa", "v1"),
        &[],
    )
    .await;
    assert_allowed(&v);
}

/// A keyless bundle logged in Rekor v2 has no integrated time: the certificate is judged at
/// the time of an RFC 3161 timestamp from a trusted authority, and without one it is denied
/// with that reason (even while the certificate is still valid now).
#[tokio::test(flavor = "multi_thread")]
async fn keyless_rekor_v2_needs_a_trusted_timestamp() {
    let reg = Registry::start().await;
    let fulcio = TestFulcio::new("v2-fulcio");
    let log = TestLog::new(KeyKind::Ed25519);
    let tsa = TestTsa::new("v2 tsa");
    let glob = format!("{}/**", reg.addr());
    // Fulcio, its CT log, the v2 log and the TSA in one TrustRoot.
    let trust_root = format!(
        "{}    timestampAuthorities:\n    - subject: {{organization: pullgate-test, commonName: tsa}}\n      uri: https://tsa.test\n      certChain: {}\n",
        fulcio
            .trust_root_yaml("private", &log.key.public_pem())
            .replace("https://rekor.test", LOG_URL),
        B64.encode(tsa.chain_pem())
    );
    let policy = cip(
        &glob,
        &format!("    signatureFormat: bundle\n    keyless: {{trustRootRef: private, identities: [{{issuer: \"{ISSUER}\", subject: \"{WORKFLOW}\"}}]}}\n    ctlog: {{trustRootRef: private}}\n"),
    );
    let signer = TestKey::generate(KeyKind::EcdsaP256);
    let cert = pem_der(&fulcio.issue(&signer, &Leaf::default()));
    for (repo, stamped) in [("stamped", true), ("unstamped", false)] {
        let digest = reg
            .push_image(repo, "v1", &format!("v2-keyless-{repo}"))
            .await;
        let stmt = statement(&digest);
        let (env, sig) = envelope(&stmt, &signer);
        let body = dsse_body(&stmt, &sig, &Verifier::Certificate(cert.clone()));
        let entry = Entry::new(&log, leaves_with(body, 2, 4), 2).json();
        let mut material = json!({
            "certificate": {"rawBytes": B64.encode(&cert)},
            "tlogEntries": [entry],
        });
        if stamped {
            material["timestampVerificationData"] = json!({"rfc3161Timestamps": [{"signedTimestamp": B64.encode(tsa.stamp_der(&sig))}]});
        }
        attach(&reg, repo, &digest, &bundle(env, material)).await;
    }
    let files = [
        ("tr.yaml", trust_root.as_str()),
        ("cip.yaml", policy.as_str()),
    ];
    let v = verify_json(&files, &reg.tag_ref("stamped", "v1"), &[]).await;
    assert_allowed(&v);
    let evidence = &v.json["policies"][0]["authorities"][0]["evidence"];
    assert!(evidence["timestamp"]["time"].is_i64(), "{evidence}");
    assert_eq!(evidence["tlog"]["tree_size"], 4, "{evidence}");
    let v = verify_json(&files, &reg.tag_ref("unstamped", "v1"), &[]).await;
    assert_denied(
        &v,
        "a keyless signature logged in Rekor v2 needs an RFC 3161 timestamp from a trusted timestamp authority",
    );

    // The certificate logged must be the signer's: another certificate's entry is refused.
    let digest = reg.push_image("other-cert", "v1", "v2-keyless-other").await;
    let stmt = statement(&digest);
    let (env, sig) = envelope(&stmt, &signer);
    let stranger = pem_der(&fulcio.issue(&TestKey::generate(KeyKind::EcdsaP256), &Leaf::default()));
    let body = dsse_body(&stmt, &sig, &Verifier::Certificate(stranger));
    let entry = Entry::new(&log, leaves_with(body, 0, 2), 0).json();
    let material = json!({
        "certificate": {"rawBytes": B64.encode(&cert)},
        "tlogEntries": [entry],
        "timestampVerificationData": {"rfc3161Timestamps": [{"signedTimestamp": B64.encode(tsa.stamp_der(&sig))}]},
    });
    attach(&reg, "other-cert", &digest, &bundle(env, material)).await;
    let v = verify_json(&files, &reg.tag_ref("other-cert", "v1"), &[]).await;
    assert_denied(&v, "signature or signer differs");
}

/// The fixture tree agrees with RFC 6962's shape: every leaf of every size up to 9 has the
/// path length the recursion gives, and the root is recomputed from it (fixture self-check,
/// so a failure of the tests above is pullgate's, not the fixture's).
#[test]
fn fixture_paths_recompute_the_root() {
    for n in 1..=9usize {
        let leaves = filler(n);
        let want = root(&leaves);
        for m in 0..n {
            let p = path(m, &leaves);
            // Recompute per RFC 9162 §2.1.3.2.
            let (mut f, mut s, mut r) = (m, n - 1, leaf_hash(&leaves[m]));
            for h in &p {
                assert!(s > 0);
                if f % 2 == 1 || f == s {
                    r = node_hash(h, &r);
                    while f % 2 == 0 && f != 0 {
                        f >>= 1;
                        s >>= 1;
                    }
                } else {
                    r = node_hash(&r, h);
                }
                f >>= 1;
                s >>= 1;
            }
            assert_eq!((s, r), (0, want), "leaf {m} of {n}");
        }
    }
}
