//! Attestations (`sha256-<hex>.att`, DSSE envelopes of in-toto statements) and `tagPrefix`,
//! against the real local registry. Envelopes are signed with the sigstore crate's signer over
//! the DSSE pre-authentication encoding; the keyless ones carry a certificate from a test Fulcio.

mod common;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use common::attest::*;
use common::fulcio::{Leaf, TestFulcio};
use common::*;
use serde_json::{json, Value};

fn cip(glob: &str, authority: &str) -> String {
    format!(
        "---\napiVersion: policy.sigstore.dev/v1beta1\nkind: ClusterImagePolicy\nmetadata: {{name: attested}}\nspec:\n  images: [{{glob: \"{glob}\"}}]\n  authorities:\n  - name: scanner\n{authority}"
    )
}

fn key_authority(key: &TestKey, attestations: &str) -> String {
    format!(
        "    key: {{data: {}}}\n    attestations:\n{attestations}",
        serde_json::to_string(&key.public_pem()).unwrap()
    )
}

const REGO: &str = r#"package sigstore
default isCompliant = false
isCompliant {
  input.predicate.scanner.result.critical == 0
}
"#;

async fn verify(files: &[(&str, &str)], image: &str) -> (i32, Value, String) {
    let dir = write_policy_dir(files);
    let policy = dir.path().to_str().unwrap().to_string();
    let out = run_pullgate_async(
        &["verify", "--policy", &policy, "--output", "json", image],
        &[],
    )
    .await;
    (
        out.code,
        serde_json::from_str(&out.stdout).unwrap_or(Value::Null),
        out.stderr,
    )
}

async fn expect(files: &[(&str, &str)], image: &str, verdict: &str, cause: &str) -> Value {
    let (code, json, stderr) = verify(files, image).await;
    assert_eq!(json["verdict"], verdict, "{json} {stderr}");
    assert_eq!(code, if verdict == "allow" { 0 } else { 1 });
    assert!(
        json["reasons"].to_string().contains(cause),
        "wanted {cause:?} in {}",
        json["reasons"]
    );
    json
}

#[tokio::test(flavor = "multi_thread")]
async fn key_signed_attestations_predicate_types_and_rego() {
    let reg = Registry::start().await;
    let key = TestKey::generate(KeyKind::EcdsaP256);
    let glob = format!("{}/**", reg.addr());

    // A clean scan, a dirty scan, and an SBOM, attached to one image.
    let digest = reg.push_image("app", "v1", "attest-app").await;
    let clean = statement(
        &digest,
        VULN,
        json!({"scanner": {"result": {"critical": 0}}}),
    );
    let sbom = statement(
        &digest,
        "https://spdx.dev/Document",
        json!({"spdxVersion": "SPDX-2.3"}),
    );
    push_attestations(
        &reg,
        "app",
        &att_tag(&digest),
        &[
            (envelope(&clean, &key), json!({"predicateType": VULN})),
            (
                envelope(&sbom, &key),
                json!({"predicateType": "https://spdx.dev/Document"}),
            ),
        ],
    )
    .await;
    let image = reg.tag_ref("app", "v1");

    // Short predicate type name, rego policy that passes.
    let rego = serde_json::to_string(REGO).unwrap();
    let policy = cip(&glob, &key_authority(&key, &format!("    - name: no-criticals\n      predicateType: vuln\n      policy: {{type: rego, data: {rego}}}\n")));
    let json = expect(&[("cip.yaml", &policy)], &image, "allow", "").await;
    let evidence = &json["policies"][0]["authorities"][0]["evidence"];
    assert_eq!(evidence[0]["name"], "no-criticals", "{evidence}");
    assert_eq!(evidence[0]["predicate_type"], VULN);

    // Two attestations required, full URI for one: both present.
    let both = cip(&glob, &key_authority(&key, "    - {name: scan, predicateType: vuln}\n    - {name: sbom, predicateType: \"https://spdx.dev/Document\"}\n"));
    expect(&[("cip.yaml", &both)], &image, "allow", "").await;

    // A predicate type that is not there.
    let missing = cip(
        &glob,
        &key_authority(
            &key,
            "    - {name: provenance, predicateType: slsaprovenance1}\n",
        ),
    );
    expect(
        &[("cip.yaml", &missing)],
        &image,
        "deny",
        "no matching attestations with type https://slsa.dev/provenance/v1, checked the following predicateTypes",
    )
    .await;

    // A rego policy that fails, with policy-controller's message.
    let strict = r#"package sigstore
default isCompliant = false
isCompliant {
  input.predicate.scanner.result.critical < 0
}
"#;
    let strict = serde_json::to_string(strict).unwrap();
    let policy = cip(&glob, &key_authority(&key, &format!("    - name: no-criticals\n      predicateType: vuln\n      policy: {{type: rego, data: {strict}}}\n")));
    expect(
        &[("cip.yaml", &policy)],
        &image,
        "deny",
        "failed evaluating rego policy for type no-criticals: policy is not compliant for query 'isCompliant = data.sigstore.isCompliant'",
    )
    .await;

    // A rego policy from a ConfigMap.
    let cm = format!(
        "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: policies, namespace: cosign-system}}\ndata:\n  vuln.rego: {rego}\n"
    );
    let policy = cip(&glob, &key_authority(&key, "    - name: no-criticals\n      predicateType: vuln\n      policy: {type: rego, configMapRef: {name: policies, key: vuln.rego}}\n"));
    expect(
        &[("cm.yaml", &cm), ("cip.yaml", &policy)],
        &image,
        "allow",
        "",
    )
    .await;

    // cue: a clear deny naming the CIP, the authority and the attestation.
    let policy = cip(&glob, &key_authority(&key, "    - name: no-criticals\n      predicateType: vuln\n      policy: {type: cue, data: \"predicateType: \\\"x\\\"\"}\n"));
    expect(&[("cip.yaml", &policy)], &image, "deny",
        "cue policies are not supported by this version of pullgate (ClusterImagePolicy attested, authority scanner, attestation no-criticals)").await;

    // Rego that does not parse: the authority is unusable, with the parse error.
    let policy = cip(&glob, &key_authority(&key, "    - name: no-criticals\n      predicateType: vuln\n      policy: {type: rego, data: \"package sigstore\\nisCompliant {\"}\n"));
    expect(&[("cip.yaml", &policy)], &image, "deny", "rego policy").await;

    // Signed by a key the authority does not trust.
    let stranger = TestKey::generate(KeyKind::EcdsaP256);
    let policy = cip(
        &glob,
        &key_authority(&stranger, "    - {name: scan, predicateType: vuln}\n"),
    );
    expect(
        &[("cip.yaml", &policy)],
        &image,
        "deny",
        "attestation signature does not verify with the authority's key",
    )
    .await;

    // An image with signatures but no attestations.
    let bare = reg.push_image("bare", "v1", "attest-bare").await;
    reg.sign("bare", &bare, &key).await;
    let policy = cip(
        &glob,
        &key_authority(&key, "    - {name: scan, predicateType: vuln}\n"),
    );
    expect(
        &[("cip.yaml", &policy)],
        &reg.tag_ref("bare", "v1"),
        "deny",
        "no attestations found",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn tampered_copied_and_malformed_attestations() {
    let reg = Registry::start().await;
    let key = TestKey::generate(KeyKind::EcdsaP256);
    let glob = format!("{}/**", reg.addr());
    let policy = cip(
        &glob,
        &key_authority(&key, "    - {name: scan, predicateType: vuln}\n"),
    );

    // Payload swapped after signing: the signature no longer covers it.
    let a = reg.push_image("tampered", "v1", "attest-tampered").await;
    let signed = statement(&a, VULN, json!({"scanner": {"result": {"critical": 0}}}));
    let mut env: Value = serde_json::from_slice(&envelope(&signed, &key)).unwrap();
    env["payload"] = json!(B64.encode(statement(
        &a,
        VULN,
        json!({"scanner": {"result": {"critical": 9}}})
    )));
    push_attestations(
        &reg,
        "tampered",
        &att_tag(&a),
        &[(
            serde_json::to_vec(&env).unwrap(),
            json!({"predicateType": VULN}),
        )],
    )
    .await;
    expect(
        &[("cip.yaml", &policy)],
        &reg.tag_ref("tampered", "v1"),
        "deny",
        "does not verify",
    )
    .await;

    // A genuine attestation of another image, copied next to this one.
    let b = reg.push_image("copied", "v1", "attest-copied").await;
    let other = reg.push_image("other", "v1", "attest-other").await;
    let about_other = statement(&other, VULN, json!({}));
    push_attestations(
        &reg,
        "copied",
        &att_tag(&b),
        &[(envelope(&about_other, &key), json!({"predicateType": VULN}))],
    )
    .await;
    expect(
        &[("cip.yaml", &policy)],
        &reg.tag_ref("copied", "v1"),
        "deny",
        "attestation is for another image",
    )
    .await;

    // Not JSON at all, and a huge layer: clear reasons, bounded reads.
    let c = reg.push_image("garbage", "v1", "attest-garbage").await;
    push_attestations(
        &reg,
        "garbage",
        &att_tag(&c),
        &[(b"{not json".to_vec(), json!({}))],
    )
    .await;
    expect(
        &[("cip.yaml", &policy)],
        &reg.tag_ref("garbage", "v1"),
        "deny",
        "not a DSSE envelope",
    )
    .await;
    let d = reg.push_image("huge", "v1", "attest-huge").await;
    push_attestations(
        &reg,
        "huge",
        &att_tag(&d),
        &[(vec![b' '; 2 << 20], json!({}))],
    )
    .await;
    let (code, json, stderr) = verify(&[("cip.yaml", &policy)], &reg.tag_ref("huge", "v1")).await;
    assert_eq!(code, 2, "could not decide: {json} {stderr}");
    assert!(
        json["reasons"].to_string().contains("signature blob"),
        "{json}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn keyless_attestations_and_tag_prefix() {
    let reg = Registry::start().await;
    let glob = format!("{}/**", reg.addr());

    // Keyless: the envelope is signed by a Fulcio-certified key (no Rekor entry: the
    // certificate is valid now).
    let fulcio = TestFulcio::new("attest-fulcio");
    let signer = TestKey::generate(KeyKind::EcdsaP256);
    let cert = fulcio.issue(&signer, &Leaf::default());
    let digest = reg.push_image("kl", "v1", "attest-keyless").await;
    let st = statement(
        &digest,
        VULN,
        json!({"scanner": {"result": {"critical": 0}}}),
    );
    push_attestations(
        &reg,
        "kl",
        &att_tag(&digest),
        &[(
            envelope(&st, &signer),
            json!({
                "predicateType": VULN,
                "dev.sigstore.cosign/certificate": cert,
                "dev.sigstore.cosign/chain": fulcio.chain_pem(),
            }),
        )],
    )
    .await;
    let ca = serde_json::to_string(&fulcio.root.pem()).unwrap();
    let authority = |subject: &str| {
        format!(
        "    keyless:\n      ca-cert: {{data: {ca}}}\n      insecureIgnoreSCT: true\n      identities: [{{issuer: \"https://token.actions.githubusercontent.com\", subjectRegExp: \"{subject}\"}}]\n    attestations:\n    - {{name: scan, predicateType: vuln}}\n"
    )
    };
    expect(
        &[("cip.yaml", &cip(&glob, &authority("acme/app")))],
        &reg.tag_ref("kl", "v1"),
        "allow",
        "",
    )
    .await;
    expect(
        &[("cip.yaml", &cip(&glob, &authority("evil/app")))],
        &reg.tag_ref("kl", "v1"),
        "deny",
        "certificate identity did not match",
    )
    .await;

    // tagPrefix: signatures under `PREFIXsha256-<hex>.sig`.
    let key = TestKey::generate(KeyKind::EcdsaP256);
    let tagged = reg.push_image("prefixed", "v1", "attest-prefix").await;
    let layer = cosign_sign_layer(&reg.repo_ref("prefixed"), &tagged, &key);
    let tag = format!("team-a-{}", signature_tag(&tagged));
    reg.push_signature_layers("prefixed", &tag, &[layer], false)
        .await;
    let with_prefix = |prefix: &str| {
        cip(
            &glob,
            &format!(
                "    key: {{data: {}}}\n    source: [{{tagPrefix: \"{prefix}\"}}]\n",
                serde_json::to_string(&key.public_pem()).unwrap()
            ),
        )
    };
    let image = reg.tag_ref("prefixed", "v1");
    expect(
        &[("cip.yaml", &with_prefix("team-a-"))],
        &image,
        "allow",
        "",
    )
    .await;
    expect(
        &[("cip.yaml", &with_prefix("team-b-"))],
        &image,
        "deny",
        "no signatures found",
    )
    .await;
    let (code, json, _) = verify(&[("cip.yaml", &with_prefix("bad/prefix:"))], &image).await;
    assert_eq!(code, 2, "{json}");
    assert!(
        json["reasons"]
            .to_string()
            .contains("check source.tagPrefix"),
        "{json}"
    );
}

/// The Rekor entry body cosign's `attest` logs: `intoto` v0.0.1 (the signer's key or
/// certificate in `publicKey`), binding the SHA-256 of the whole envelope.
fn intoto_v001_body(envelope: &[u8], payload: &[u8], signer_pem: &str) -> String {
    json!({
        "apiVersion": "0.0.1",
        "kind": "intoto",
        "spec": {
            "content": {
                "hash": {"algorithm": "sha256", "value": sha256_digest(envelope).trim_start_matches("sha256:")},
                "payloadHash": {"algorithm": "sha256", "value": sha256_digest(payload).trim_start_matches("sha256:")},
            },
            "publicKey": B64.encode(signer_pem),
        },
    })
    .to_string()
}

/// `intoto` v0.0.2: the signer sits in the envelope's signature entry.
fn intoto_v002_body(envelope: &[u8], payload: &[u8], signer_pem: &str) -> String {
    json!({
        "apiVersion": "0.0.2",
        "kind": "intoto",
        "spec": {
            "content": {
                "envelope": {
                    "payloadType": IN_TOTO,
                    "signatures": [{"publicKey": B64.encode(signer_pem), "sig": "c2ln"}],
                },
                "hash": {"algorithm": "sha256", "value": sha256_digest(envelope).trim_start_matches("sha256:")},
                "payloadHash": {"algorithm": "sha256", "value": sha256_digest(payload).trim_start_matches("sha256:")},
            },
        },
    })
    .to_string()
}

/// `dsse` v0.0.1, what newer cosign logs.
fn dsse_body(envelope: &[u8], payload: &[u8], signer_pem: &str) -> String {
    json!({
        "apiVersion": "0.0.1",
        "kind": "dsse",
        "spec": {
            "envelopeHash": {"algorithm": "sha256", "value": sha256_digest(envelope).trim_start_matches("sha256:")},
            "payloadHash": {"algorithm": "sha256", "value": sha256_digest(payload).trim_start_matches("sha256:")},
            "signatures": [{"signature": "c2ln", "verifier": B64.encode(signer_pem)}],
        },
    })
    .to_string()
}

/// Builds a case's bundle annotation from (envelope, statement); `None`: no bundle.
type BundleFor<'a> = Box<dyn Fn(&[u8], &[u8]) -> Option<String> + 'a>;

/// Pushes an image `REPO:v1` with one attestation signed by `key`, its bundle made by
/// `bundle`; returns the image reference.
async fn push_case(reg: &Registry, key: &TestKey, repo: &str, bundle: BundleFor<'_>) -> String {
    let digest = reg.push_image(repo, "v1", &format!("ctlog-{repo}")).await;
    let st = statement(&digest, VULN, json!({}));
    let env = envelope(&st, key);
    let mut annotations = json!({"predicateType": VULN});
    if let Some(b) = bundle(&env, &st) {
        annotations["dev.sigstore.cosign/bundle"] = json!(b);
    }
    push_attestations(reg, repo, &att_tag(&digest), &[(env, annotations)]).await;
    reg.tag_ref(repo, "v1")
}

fn rekor_trust_root(url: &str, rekor: &TestRekor) -> String {
    format!(
        "---\napiVersion: policy.sigstore.dev/v1alpha1\nkind: TrustRoot\nmetadata: {{name: private-rekor}}\nspec:\n  sigstoreKeys:\n    tLogs:\n    - baseURL: {url}\n      hashAlgorithm: sha-256\n      publicKey: {}\n",
        B64.encode(rekor.public_pem())
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn ctlog_requires_a_rekor_bundle_bound_to_the_envelope() {
    let reg = Registry::start().await;
    let rekor = TestRekor::new();
    let key = TestKey::generate(KeyKind::EcdsaP256);
    let glob = format!("{}/**", reg.addr());
    let url = "https://rekor.example.test";
    let trust_root = rekor_trust_root(url, &rekor);
    let policy = cip(
        &glob,
        &format!(
            "{}    ctlog: {{url: \"{url}\"}}\n",
            key_authority(&key, "    - {name: scan, predicateType: vuln}\n")
        ),
    );
    let files = [
        ("tr.yaml", trust_root.as_str()),
        ("cip.yaml", policy.as_str()),
    ];
    let pem = key.public_pem();

    // Logged as `intoto` v0.0.1 and as `dsse`: allowed, with the log entry as evidence.
    let p = pem.clone();
    let r = &rekor;
    let image = push_case(
        &reg,
        &key,
        "intoto",
        Box::new(move |env, st| {
            Some(r.bundle_for_body(&intoto_v001_body(env, st, &p), 1_700_000_000))
        }),
    )
    .await;
    let json = expect(&files, &image, "allow", "").await;
    let evidence = &json["policies"][0]["authorities"][0]["evidence"][0];
    assert_eq!(
        evidence["tlog"]["integrated_time"], 1_700_000_000,
        "{evidence}"
    );
    let p = pem.clone();
    let image = push_case(
        &reg,
        &key,
        "dsse",
        Box::new(move |env, st| Some(r.bundle_for_body(&dsse_body(env, st, &p), 1_700_000_000))),
    )
    .await;
    expect(&files, &image, "allow", "").await;

    // No bundle at all.
    let image = push_case(&reg, &key, "unlogged", Box::new(|_, _| None)).await;
    expect(
        &files,
        &image,
        "deny",
        "ctlog is required but the attestation has no Rekor bundle",
    )
    .await;

    // A genuine entry, but for another envelope (a second signing of the same statement).
    let p = pem.clone();
    let k = &key;
    let image = push_case(
        &reg,
        &key,
        "swapped",
        Box::new(move |_, st| {
            let other = envelope(st, k);
            Some(r.bundle_for_body(&intoto_v001_body(&other, st, &p), 1_700_000_000))
        }),
    )
    .await;
    expect(&files, &image, "deny", "envelope hash differs").await;

    // An entry naming another signer.
    let stranger = TestKey::generate(KeyKind::EcdsaP256).public_pem();
    let image = push_case(
        &reg,
        &key,
        "other-signer",
        Box::new(move |env, st| {
            Some(r.bundle_for_body(&intoto_v001_body(env, st, &stranger), 1_700_000_000))
        }),
    )
    .await;
    expect(&files, &image, "deny", "signer differs").await;

    // A log the policy does not trust, and a kind that cannot log an attestation.
    let foreign = TestRekor::new();
    let p = pem.clone();
    let f = &foreign;
    let image = push_case(
        &reg,
        &key,
        "foreign",
        Box::new(move |env, st| {
            Some(f.bundle_for_body(&intoto_v001_body(env, st, &p), 1_700_000_000))
        }),
    )
    .await;
    expect(&files, &image, "deny", "not a trusted transparency log").await;
    let p = pem.clone();
    let image = push_case(
        &reg,
        &key,
        "hashedrekord",
        Box::new(move |env, _| Some(r.bundle_for(env, "c2ln", &p, 1_700_000_000))),
    )
    .await;
    expect(
        &files,
        &image,
        "deny",
        "a hashedrekord entry cannot log an attestation",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn keyless_attestation_is_judged_at_its_log_time() {
    let reg = Registry::start().await;
    let fulcio = TestFulcio::new("attest-fulcio-rekor");
    let rekor = TestRekor::new();
    let trust_root = fulcio.trust_root_yaml("private", &rekor.public_pem());
    let glob = format!("{}/**", reg.addr());
    let policy = cip(
        &glob,
        "    keyless: {trustRootRef: private, identities: [{issuer: \"https://token.actions.githubusercontent.com\", subjectRegExp: \"^https://github.com/acme/\"}]}\n    ctlog: {trustRootRef: private}\n    attestations:\n    - {name: scan, predicateType: vuln}\n",
    );
    let files = [
        ("tr.yaml", trust_root.as_str()),
        ("cip.yaml", policy.as_str()),
    ];

    // A ten-minute certificate that expired an hour ago, logged while it was valid.
    let signer = TestKey::generate(KeyKind::EcdsaP256);
    let leaf = Leaf {
        not_before: fulcio::now() - 7200,
        lifetime: 600,
        ..Leaf::default()
    };
    let cert = fulcio.issue(&signer, &leaf);
    let push = |repo: &'static str, logged_at: Option<i64>| {
        let (reg, signer, cert, fulcio, rekor) = (&reg, &signer, &cert, &fulcio, &rekor);
        async move {
            let digest = reg
                .push_image(repo, "v1", &format!("kl-rekor-{repo}"))
                .await;
            let st = statement(&digest, VULN, json!({}));
            let env = envelope(&st, signer);
            let mut annotations = json!({
                "predicateType": VULN,
                "dev.sigstore.cosign/certificate": cert,
                "dev.sigstore.cosign/chain": fulcio.chain_pem(),
            });
            if let Some(t) = logged_at {
                let body = intoto_v002_body(&env, &st, cert);
                annotations["dev.sigstore.cosign/bundle"] = json!(rekor.bundle_for_body(&body, t));
            }
            push_attestations(reg, repo, &att_tag(&digest), &[(env, annotations)]).await;
            reg.tag_ref(repo, "v1")
        }
    };

    let image = push("in-time", Some(fulcio::now() - 7000)).await;
    let json = expect(&files, &image, "allow", "").await;
    let evidence = &json["policies"][0]["authorities"][0]["evidence"][0];
    assert_eq!(
        evidence["issuer"], "https://token.actions.githubusercontent.com",
        "{evidence}"
    );
    assert!(evidence["subject"]
        .as_str()
        .unwrap_or_default()
        .starts_with("https://github.com/acme/"));

    // Logged after the certificate expired; or not logged although ctlog demands it.
    let image = push("late", Some(fulcio::now() - 60)).await;
    expect(&files, &image, "deny", "not valid at").await;
    let image = push("unlogged", None).await;
    expect(
        &files,
        &image,
        "deny",
        "ctlog is required but the attestation has no Rekor bundle",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rego_errors_from_the_policy_reach_the_user() {
    let reg = Registry::start().await;
    let key = TestKey::generate(KeyKind::EcdsaP256);
    let glob = format!("{}/**", reg.addr());
    let digest = reg.push_image("scanned", "v1", "attest-rego-msg").await;
    let st = statement(
        &digest,
        VULN,
        json!({"scanner": {"result": {"critical": 3}}}),
    );
    push_attestations(
        &reg,
        "scanned",
        &att_tag(&digest),
        &[(envelope(&st, &key), json!({"predicateType": VULN}))],
    )
    .await;
    // policy-controller's documented form: a set of {result, error, warning} objects.
    let rego = r#"package sigstore
isCompliant[response] {
  n := input.predicate.scanner.result.critical
  response := {"result": n == 0, "error": sprintf("%d critical vulnerabilities", [n]), "warning": ""}
}
"#;
    let policy = cip(
        &glob,
        &key_authority(
            &key,
            &format!(
                "    - name: no-criticals\n      predicateType: {VULN}\n      policy: {{type: rego, data: {}}}\n",
                serde_json::to_string(rego).unwrap()
            ),
        ),
    );
    expect(
        &[("cip.yaml", &policy)],
        &reg.tag_ref("scanned", "v1"),
        "deny",
        "failed evaluating rego policy for type no-criticals: policy is not compliant for query 'isCompliant = data.sigstore.isCompliant' with errors: 3 critical vulnerabilities",
    )
    .await;
}

/// A keyless attestation with an RFC 3161 timestamp over the envelope (what cosign stamps for
/// attestations): the expired certificate is judged at the stamped time.
#[tokio::test(flavor = "multi_thread")]
async fn keyless_attestation_judged_at_its_rfc3161_timestamp() {
    use common::tsa::{TestTsa, RFC3161_TIMESTAMP_ANNOTATION};
    let reg = Registry::start().await;
    let fulcio = TestFulcio::new("attest-fulcio-tsa");
    let rekor = TestRekor::new();
    let tsa = TestTsa::new("attest tsa");
    let glob = format!("{}/**", reg.addr());
    let signer = TestKey::generate(KeyKind::EcdsaP256);
    let issued = fulcio::now() - 60;
    let leaf = Leaf {
        not_before: issued,
        lifetime: 63,
        ..Leaf::default()
    };
    let cert = fulcio.issue(&signer, &leaf);
    let mut images = Vec::new();
    for (repo, stamp_envelope) in [("stamped", true), ("wrongstamp", false)] {
        let digest = reg.push_image(repo, "v1", &format!("kl-tsa-{repo}")).await;
        let st = statement(&digest, VULN, json!({}));
        let env = envelope(&st, &signer);
        let stamped: &[u8] = if stamp_envelope { &env } else { &st };
        let annotations = json!({
            "predicateType": VULN,
            "dev.sigstore.cosign/certificate": cert,
            "dev.sigstore.cosign/chain": fulcio.chain_pem(),
            RFC3161_TIMESTAMP_ANNOTATION: tsa.annotation(stamped),
        });
        push_attestations(&reg, repo, &att_tag(&digest), &[(env, annotations)]).await;
        images.push(reg.tag_ref(repo, "v1"));
    }
    while fulcio::now() <= issued + 63 {
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    let trust_root = fulcio.trust_root_yaml("private", &rekor.public_pem());
    let tsa_root = tsa.trust_root_yaml("tsa");
    let policy = cip(
        &glob,
        "    keyless: {trustRootRef: private, identities: [{issuer: \"https://token.actions.githubusercontent.com\", subjectRegExp: \"^https://github.com/acme/\"}]}\n    rfc3161timestamp: {trustRootRef: tsa}\n    attestations:\n    - {name: scan, predicateType: vuln}\n",
    );
    let files = [
        ("tr.yaml", trust_root.as_str()),
        ("tsa.yaml", tsa_root.as_str()),
        ("cip.yaml", policy.as_str()),
    ];
    expect(&files, &images[0], "allow", "").await;
    expect(&files, &images[1], "deny", "message imprint differs").await;
}
