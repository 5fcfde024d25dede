//! Keyless authorities end to end: a test Fulcio (root → intermediate → short-lived leaf with
//! the OIDC issuer extension and a real embedded SCT from a test CT log), a test Rekor, images
//! in the real local registry signed with the sigstore crate, decided by `pullgate verify`.

mod common;

use common::fulcio::{now, Leaf, TestFulcio};
use common::*;

/// Signs `REPO@DIGEST` with a fresh key, attaches a certificate for it issued by `fulcio`
/// (`leaf`) and its chain, and, with `rekor`, a bundle logged at `integrated_time`.
async fn sign_keyless(
    reg: &Registry,
    repo: &str,
    digest: &str,
    fulcio: &TestFulcio,
    leaf: &Leaf<'_>,
    rekor: Option<(&TestRekor, i64)>,
) {
    let signer = TestKey::generate(KeyKind::EcdsaP256);
    let cert = fulcio.issue(&signer, leaf);
    let layer = cosign_sign_layer(&reg.repo_ref(repo), digest, &signer)
        .with_annotation(CERTIFICATE_ANNOTATION, &cert)
        .with_annotation(CHAIN_ANNOTATION, &fulcio.chain_pem());
    let layer = match rekor {
        Some((rekor, time)) => {
            let sig = layer.signature_b64().unwrap().to_string();
            let bundle = rekor.bundle_for(&layer.payload, &sig, &cert, time);
            layer.with_annotation(BUNDLE_ANNOTATION, &bundle)
        }
        None => layer,
    };
    reg.push_signature_layers(repo, &signature_tag(digest), &[layer], false)
        .await;
}

/// A CIP with one keyless authority (`keyless` is its YAML flow mapping body) and optional
/// authority-level extras, e.g. `ctlog: {trustRootRef: t}`.
fn keyless_cip(glob: &str, keyless: &str, extra: &str) -> String {
    format!(
        "---\napiVersion: policy.sigstore.dev/v1beta1\nkind: ClusterImagePolicy\nmetadata: {{name: keyless}}\nspec:\n  images: [{{glob: \"{glob}\"}}]\n  authorities:\n  - name: fulcio\n    keyless: {{{keyless}}}\n{extra}"
    )
}

async fn verify(files: &[(&str, &str)], image: &str) -> Verified {
    verify_json(files, image, &[]).await
}

const ISSUER: &str = "https://token.actions.githubusercontent.com";
const WORKFLOW: &str = "https://github.com/acme/app/.github/workflows/release.yml@refs/heads/main";

#[tokio::test(flavor = "multi_thread")]
async fn trust_root_identities_sct_and_rekor() {
    let reg = Registry::start().await;
    let fulcio = TestFulcio::new("test-fulcio");
    let rekor = TestRekor::new();
    let trust_root = fulcio.trust_root_yaml("private", &rekor.public_pem());
    let glob = format!("{}/**", reg.addr());
    let identity = format!("identities: [{{issuer: \"{ISSUER}\", subject: \"{WORKFLOW}\"}}]");

    // Signed by the workflow, logged in Rekor at signing time: allowed, with the identity.
    let good = reg.push_image("good", "v1", "keyless-good").await;
    sign_keyless(
        &reg,
        "good",
        &good,
        &fulcio,
        &Leaf::default(),
        Some((&rekor, now())),
    )
    .await;
    let cip = keyless_cip(&glob, &format!("trustRootRef: private, {identity}"), "");
    let image = reg.tag_ref("good", "v1");
    let v = verify(&[("tr.yaml", &trust_root), ("cip.yaml", &cip)], &image).await;
    assert_allowed(&v);
    let evidence = &v.json["policies"][0]["authorities"][0]["evidence"];
    assert_eq!(evidence["issuer"], ISSUER, "{evidence}");
    assert_eq!(evidence["subject"], WORKFLOW, "{evidence}");
    // Leaf, then the trusted CA it chains to (every certificate of the TrustRoot is trusted).
    let chain = evidence["certificate_chain"].as_array().unwrap();
    assert_eq!(chain.len(), 2, "{evidence}");
    assert_eq!(
        chain[1], "CN=test-fulcio intermediate,O=pullgate-test",
        "{evidence}"
    );
    assert!(
        evidence["tlog"]["integrated_time"].as_i64().is_some(),
        "{evidence}"
    );

    // Regular expressions are unanchored, as in policy-controller.
    let re = "identities: [{issuerRegExp: \"githubusercontent\", subjectRegExp: \"acme/app/\"}]";
    let cip = keyless_cip(&glob, &format!("trustRootRef: private, {re}"), "");
    assert_allowed(&verify(&[("tr.yaml", &trust_root), ("cip.yaml", &cip)], &image).await);

    // Wrong issuer, wrong subject: the certificate's identity is named in the reason.
    for wrong in [
        format!(
            "identities: [{{issuer: \"https://accounts.google.com\", subject: \"{WORKFLOW}\"}}]"
        ),
        format!(
            "identities: [{{issuer: \"{ISSUER}\", subjectRegExp: \"^https://github.com/evil/\"}}]"
        ),
    ] {
        let cip = keyless_cip(&glob, &format!("trustRootRef: private, {wrong}"), "");
        let v = verify(&[("tr.yaml", &trust_root), ("cip.yaml", &cip)], &image).await;
        assert_denied(&v, "certificate identity did not match");
        assert!(v.reasons().contains(WORKFLOW), "{}", v.reasons());
        assert!(v
            .reasons()
            .contains("signature keyless validation failed for authority fulcio"));
    }
    // One of several identities is enough.
    let either = format!(
        "identities: [{{issuer: \"https://accounts.google.com\", subject: x}}, {{issuer: \"{ISSUER}\", subject: \"{WORKFLOW}\"}}]"
    );
    let cip = keyless_cip(&glob, &format!("trustRootRef: private, {either}"), "");
    assert_allowed(&verify(&[("tr.yaml", &trust_root), ("cip.yaml", &cip)], &image).await);

    // An email identity (the SAN of an interactive `cosign sign`).
    let person = reg.push_image("person", "v1", "keyless-email").await;
    let leaf = Leaf {
        issuer: "https://accounts.google.com",
        san: "email:dev@acme.example",
        ..Leaf::default()
    };
    sign_keyless(
        &reg,
        "person",
        &person,
        &fulcio,
        &leaf,
        Some((&rekor, now())),
    )
    .await;
    let cip = keyless_cip(
        &glob,
        "trustRootRef: private, identities: [{issuer: \"https://accounts.google.com\", subject: dev@acme.example}]",
        "",
    );
    assert_allowed(
        &verify(
            &[("tr.yaml", &trust_root), ("cip.yaml", &cip)],
            &reg.tag_ref("person", "v1"),
        )
        .await,
    );

    // A certificate that expired long ago, but was valid when Rekor logged the signature.
    let old = reg.push_image("old", "v1", "keyless-old").await;
    let issued = now() - 7 * 86400;
    let leaf = Leaf {
        not_before: issued,
        ..Leaf::default()
    };
    sign_keyless(
        &reg,
        "old",
        &old,
        &fulcio,
        &leaf,
        Some((&rekor, issued + 30)),
    )
    .await;
    let cip = keyless_cip(&glob, &format!("trustRootRef: private, {identity}"), "");
    assert_allowed(
        &verify(
            &[("tr.yaml", &trust_root), ("cip.yaml", &cip)],
            &reg.tag_ref("old", "v1"),
        )
        .await,
    );

    // The same expired certificate without any log entry: nothing says when it signed.
    let stale = reg.push_image("stale", "v1", "keyless-stale").await;
    sign_keyless(&reg, "stale", &stale, &fulcio, &leaf, None).await;
    let v = verify(
        &[("tr.yaml", &trust_root), ("cip.yaml", &cip)],
        &reg.tag_ref("stale", "v1"),
    )
    .await;
    assert_denied(&v, "signing certificate was not valid at");

    // A logged time outside the certificate's validity.
    let late = reg.push_image("late", "v1", "keyless-late").await;
    sign_keyless(
        &reg,
        "late",
        &late,
        &fulcio,
        &leaf,
        Some((&rekor, issued + 3600)),
    )
    .await;
    let v = verify(
        &[("tr.yaml", &trust_root), ("cip.yaml", &cip)],
        &reg.tag_ref("late", "v1"),
    )
    .await;
    assert_denied(&v, "signing certificate was not valid at");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_set_bad_sct_untrusted_root_and_garbage() {
    let reg = Registry::start().await;
    let fulcio = TestFulcio::new("test-fulcio");
    let rekor = TestRekor::new();
    let trust_root = fulcio.trust_root_yaml("private", &rekor.public_pem());
    let glob = format!("{}/**", reg.addr());
    let identity = format!("identities: [{{issuer: \"{ISSUER}\", subject: \"{WORKFLOW}\"}}]");
    let cip = keyless_cip(&glob, &format!("trustRootRef: private, {identity}"), "");
    let files = |cip: &str| {
        vec![
            ("tr.yaml".to_string(), trust_root.clone()),
            ("cip.yaml".to_string(), cip.to_string()),
        ]
    };
    let run = |files: Vec<(String, String)>, image: String| async move {
        let refs: Vec<(&str, &str)> = files
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        verify(&refs, &image).await
    };

    // A bundle whose SET was made by another log key.
    let forged = reg.push_image("forged", "v1", "keyless-forged-set").await;
    let other_log = TestRekor::new();
    sign_keyless(
        &reg,
        "forged",
        &forged,
        &fulcio,
        &Leaf::default(),
        Some((&other_log, now())),
    )
    .await;
    let v = run(files(&cip), reg.tag_ref("forged", "v1")).await;
    assert_denied(&v, "not a trusted transparency log");

    // A bundle with a tampered body: the SET no longer covers it.
    let tampered = reg.push_image("tampered", "v1", "keyless-tampered").await;
    let signer = TestKey::generate(KeyKind::EcdsaP256);
    let cert = fulcio.issue(&signer, &Leaf::default());
    let layer = cosign_sign_layer(&reg.repo_ref("tampered"), &tampered, &signer);
    let sig = layer.signature_b64().unwrap().to_string();
    let bundle = rekor.tampered_bundle_for(&layer.payload, &sig, &cert, now());
    let layer = layer
        .with_annotation(CERTIFICATE_ANNOTATION, &cert)
        .with_annotation(CHAIN_ANNOTATION, &fulcio.chain_pem())
        .with_annotation(BUNDLE_ANNOTATION, &bundle);
    reg.push_signature_layers("tampered", &signature_tag(&tampered), &[layer], false)
        .await;
    let v = run(files(&cip), reg.tag_ref("tampered", "v1")).await;
    assert_denied(&v, "signed entry timestamp does not verify");

    // An SCT whose signature does not verify, and no SCT at all.
    let bad_sct = reg.push_image("badsct", "v1", "keyless-bad-sct").await;
    let leaf = Leaf {
        bad_sct: true,
        ..Leaf::default()
    };
    sign_keyless(
        &reg,
        "badsct",
        &bad_sct,
        &fulcio,
        &leaf,
        Some((&rekor, now())),
    )
    .await;
    let v = run(files(&cip), reg.tag_ref("badsct", "v1")).await;
    assert_denied(&v, "no valid SCT");
    let no_sct = reg.push_image("nosct", "v1", "keyless-no-sct").await;
    let leaf = Leaf {
        sct: false,
        ..Leaf::default()
    };
    sign_keyless(
        &reg,
        "nosct",
        &no_sct,
        &fulcio,
        &leaf,
        Some((&rekor, now())),
    )
    .await;
    let v = run(files(&cip), reg.tag_ref("nosct", "v1")).await;
    assert_denied(&v, "certificate has no embedded SCT");
    // insecureIgnoreSCT accepts both.
    let lax = keyless_cip(
        &glob,
        &format!("trustRootRef: private, insecureIgnoreSCT: true, {identity}"),
        "",
    );
    assert_allowed(&run(files(&lax), reg.tag_ref("nosct", "v1")).await);
    assert_allowed(&run(files(&lax), reg.tag_ref("badsct", "v1")).await);

    // Signed under another CA: no path to a trusted root.
    let rogue = TestFulcio::new("rogue-fulcio");
    let foreign = reg.push_image("foreign", "v1", "keyless-foreign").await;
    sign_keyless(
        &reg,
        "foreign",
        &foreign,
        &rogue,
        &Leaf::default(),
        Some((&rekor, now())),
    )
    .await;
    let v = run(files(&cip), reg.tag_ref("foreign", "v1")).await;
    assert_denied(&v, "does not lead to a trusted root");

    // Garbage where the certificate should be: a clear reason, no crash.
    let garbage = reg.push_image("garbage", "v1", "keyless-garbage").await;
    let signer = TestKey::generate(KeyKind::EcdsaP256);
    let layer = cosign_sign_layer(&reg.repo_ref("garbage"), &garbage, &signer).with_annotation(
        CERTIFICATE_ANNOTATION,
        "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n",
    );
    reg.push_signature_layers("garbage", &signature_tag(&garbage), &[layer], false)
        .await;
    let v = run(files(&cip), reg.tag_ref("garbage", "v1")).await;
    assert_denied(&v, "signing certificate: not a DER certificate");

    // A key-signed image (no certificate) under a keyless policy.
    let keyed = reg.push_image("keyed", "v1", "keyless-keyed").await;
    reg.sign("keyed", &keyed, &TestKey::generate(KeyKind::EcdsaP256))
        .await;
    let v = run(files(&cip), reg.tag_ref("keyed", "v1")).await;
    assert_denied(&v, "signature has no certificate");
}

#[tokio::test(flavor = "multi_thread")]
async fn ca_cert_authority_is_really_used() {
    let reg = Registry::start().await;
    let fulcio = TestFulcio::new("private-ca");
    let glob = format!("{}/**", reg.addr());
    let identity = format!("identities: [{{issuer: \"{ISSUER}\", subject: \"{WORKFLOW}\"}}]");
    let digest = reg.push_image("app", "v1", "keyless-ca-cert").await;
    sign_keyless(&reg, "app", &digest, &fulcio, &Leaf::default(), None).await;
    let image = reg.tag_ref("app", "v1");

    // The private root as ca-cert: the chain is checked against it (no log, so the
    // certificate must be valid now, which it is).
    let ca = serde_json::to_string(&fulcio.root.pem()).unwrap();
    let cip = keyless_cip(
        &glob,
        &format!("ca-cert: {{data: {ca}}}, insecureIgnoreSCT: true, {identity}"),
        "",
    );
    assert_allowed(&verify(&[("cip.yaml", &cip)], &image).await);

    // Another CA's root as ca-cert: denied (policy-controller accepts ca-cert and ignores it).
    let other = TestFulcio::new("other-ca");
    let ca = serde_json::to_string(&other.root.pem()).unwrap();
    let cip = keyless_cip(
        &glob,
        &format!("ca-cert: {{data: {ca}}}, insecureIgnoreSCT: true, {identity}"),
        "",
    );
    let v = verify(&[("cip.yaml", &cip)], &image).await;
    assert_denied(&v, "does not lead to a trusted root");

    // The public-good roots (no ca-cert, no TrustRoot) do not trust a private CA either.
    let cip = keyless_cip(&glob, &format!("insecureIgnoreSCT: true, {identity}"), "");
    let v = verify(&[("cip.yaml", &cip)], &image).await;
    assert_denied(&v, "does not lead to a trusted root");

    // ca-cert from a Secret in the controller namespace.
    let secret = format!(
        "---\napiVersion: v1\nkind: Secret\nmetadata: {{name: ca, namespace: cosign-system}}\nstringData:\n  ca.crt: {}\n",
        serde_json::to_string(&fulcio.root.pem()).unwrap()
    );
    let cip = keyless_cip(
        &glob,
        &format!("ca-cert: {{secretRef: {{name: ca}}}}, insecureIgnoreSCT: true, {identity}"),
        "",
    );
    assert_allowed(&verify(&[("secret.yaml", &secret), ("cip.yaml", &cip)], &image).await);
}

/// A keyless signature layer for `REPO@DIGEST` (certificate and chain attached, no bundle)
/// and the raw signature bytes an RFC 3161 timestamp covers.
fn keyless_layer(
    reg: &Registry,
    repo: &str,
    digest: &str,
    fulcio: &TestFulcio,
    leaf: &Leaf<'_>,
) -> (SigLayer, Vec<u8>) {
    use base64::Engine as _;
    let signer = TestKey::generate(KeyKind::EcdsaP256);
    let cert = fulcio.issue(&signer, leaf);
    let layer = cosign_sign_layer(&reg.repo_ref(repo), digest, &signer)
        .with_annotation(CERTIFICATE_ANNOTATION, &cert)
        .with_annotation(CHAIN_ANNOTATION, &fulcio.chain_pem());
    let raw = base64::engine::general_purpose::STANDARD
        .decode(layer.signature_b64().unwrap())
        .unwrap();
    (layer, raw)
}

#[tokio::test(flavor = "multi_thread")]
async fn rfc3161_timestamp_judges_an_expired_certificate() {
    use common::tsa::{TestTsa, RFC3161_TIMESTAMP_ANNOTATION};
    let reg = Registry::start().await;
    let fulcio = TestFulcio::new("test-fulcio");
    let rekor = TestRekor::new();
    let tsa = TestTsa::new("test tsa");
    let rogue_tsa = TestTsa::new("test tsa");
    let files = [
        (
            "tr.yaml",
            fulcio.trust_root_yaml("private", &rekor.public_pem()),
        ),
        ("tsa.yaml", tsa.trust_root_yaml("tsa")),
    ];
    let glob = format!("{}/**", reg.addr());
    let identity = format!("identities: [{{issuer: \"{ISSUER}\", subject: \"{WORKFLOW}\"}}]");
    // A certificate that expires three seconds from now, and no Rekor bundle at all.
    let issued = now() - 60;
    let leaf = Leaf {
        not_before: issued,
        lifetime: 63,
        ..Leaf::default()
    };
    let mut images = Vec::new();
    for (repo, stamp) in [
        ("stamped", Some(&tsa)),
        ("unstamped", None),
        ("otherdata", Some(&tsa)),
        ("roguestamp", Some(&rogue_tsa)),
    ] {
        let digest = reg.push_image(repo, "v1", &format!("tsa-{repo}")).await;
        let (layer, raw) = keyless_layer(&reg, repo, &digest, &fulcio, &leaf);
        let layer = match stamp {
            None => layer,
            // cosign stamps the raw signature bytes; "otherdata" stamps the payload instead.
            Some(t) if repo == "otherdata" => {
                let payload = layer.payload.clone();
                layer.with_annotation(RFC3161_TIMESTAMP_ANNOTATION, &t.annotation(&payload))
            }
            Some(t) => layer.with_annotation(RFC3161_TIMESTAMP_ANNOTATION, &t.annotation(&raw)),
        };
        reg.push_signature_layers(repo, &signature_tag(&digest), &[layer], false)
            .await;
        images.push(reg.tag_ref(repo, "v1"));
    }
    // Let the certificate expire: only the timestamp can now say it was valid when used.
    while now() <= issued + 63 {
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    let with = |cip: String| {
        let mut f: Vec<(String, String)> = files
            .iter()
            .map(|(a, b)| (a.to_string(), b.clone()))
            .collect();
        f.push(("cip.yaml".into(), cip));
        f
    };
    let run = |files: Vec<(String, String)>, image: String| async move {
        let refs: Vec<(&str, &str)> = files
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        verify(&refs, &image).await
    };
    let stamped_cip = keyless_cip(
        &glob,
        &format!("trustRootRef: private, {identity}"),
        "    rfc3161timestamp: {trustRootRef: tsa}\n",
    );
    let v = run(with(stamped_cip.clone()), images[0].clone()).await;
    assert_allowed(&v);
    let evidence = &v.json["policies"][0]["authorities"][0]["evidence"];
    let stamped_at = evidence["timestamp"]["time"].as_i64().unwrap();
    assert!((issued..=issued + 63).contains(&stamped_at), "{evidence}");
    assert!(evidence["tlog"].is_null(), "{evidence}");
    assert_eq!(evidence["subject"], WORKFLOW, "{evidence}");

    let v = run(with(stamped_cip.clone()), images[1].clone()).await;
    assert_denied(
        &v,
        "rfc3161timestamp is required but the signature has no RFC 3161 timestamp",
    );
    let v = run(with(stamped_cip.clone()), images[2].clone()).await;
    assert_denied(&v, "message imprint differs");
    let v = run(with(stamped_cip), images[3].clone()).await;
    assert_denied(&v, "timestamp authority not trusted");

    // Without rfc3161timestamp no timestamp authority is trusted: the timestamp proves
    // nothing, the expired certificate is judged now and denied.
    let plain = keyless_cip(&glob, &format!("trustRootRef: private, {identity}"), "");
    let v = run(with(plain), images[0].clone()).await;
    assert_denied(&v, "signing certificate was not valid at");
    assert!(
        v.reasons().contains("now: no Rekor bundle or timestamp"),
        "{}",
        v.reasons()
    );

    // A TrustRoot without timestamp authorities cannot back rfc3161timestamp.
    let empty = keyless_cip(
        &glob,
        &format!("trustRootRef: private, {identity}"),
        "    rfc3161timestamp: {trustRootRef: private}\n",
    );
    let v = run(with(empty), images[0].clone()).await;
    assert_denied(&v, "has no timestampAuthorities");
}

#[tokio::test(flavor = "multi_thread")]
async fn trust_windows_and_unsupported_trust_sources_deny() {
    let reg = Registry::start().await;
    let fulcio = TestFulcio::new("test-fulcio");
    let rekor = TestRekor::new();
    let glob = format!("{}/**", reg.addr());
    let identity = format!("identities: [{{issuer: \"{ISSUER}\", subject: \"{WORKFLOW}\"}}]");
    let digest = reg.push_image("app", "v1", "keyless-windows").await;
    sign_keyless(
        &reg,
        "app",
        &digest,
        &fulcio,
        &Leaf::default(),
        Some((&rekor, now())),
    )
    .await;
    let image = reg.tag_ref("app", "v1");
    let cip = keyless_cip(&glob, &format!("trustRootRef: private, {identity}"), "");
    let trust_root = fulcio.trust_root_yaml("private", &rekor.public_pem());
    assert_allowed(&verify(&[("tr.yaml", &trust_root), ("cip.yaml", &cip)], &image).await);

    // The same CA, trusted only until yesterday (a retired root): denied.
    let retired = trust_root.replace(
        "      uri: https://fulcio.test\n",
        "      uri: https://fulcio.test\n      validFor: {start: \"2020-01-01T00:00:00Z\", end: \"2021-01-01T00:00:00Z\"}\n",
    );
    assert_ne!(retired, trust_root);
    let v = verify(&[("tr.yaml", &retired), ("cip.yaml", &cip)], &image).await;
    assert_denied(
        &v,
        "is only trusted from 2020-01-01T00:00:00Z to 2021-01-01T00:00:00Z",
    );

    // A TUF TrustRoot whose root is not TUF metadata: a clear reason, never a pass (and no
    // fetch: the root is checked before the mirror is asked).
    let tuf = "---\napiVersion: policy.sigstore.dev/v1alpha1\nkind: TrustRoot\nmetadata: {name: private}\nspec:\n  remote: {mirror: \"https://tuf.example\", root: cm9vdA==}\n";
    let v = verify(&[("tr.yaml", tuf), ("cip.yaml", &cip)], &image).await;
    assert_denied(
        &v,
        "spec.remote (TUF https://tuf.example): trusted root (spec root): malformed",
    );
    // A plain-HTTP mirror off the host is refused.
    let http = tuf.replace("https://tuf.example", "http://tuf.example");
    let v = verify(&[("tr.yaml", &http), ("cip.yaml", &cip)], &image).await;
    assert_denied(
        &v,
        "must be an https:// URL (http:// only on a loopback address)",
    );

    // A private Fulcio named by url alone: its roots are unknown, so it is refused.
    let by_url = keyless_cip(
        &glob,
        &format!("url: \"https://fulcio.internal.example\", {identity}"),
        "",
    );
    let v = verify(&[("cip.yaml", &by_url)], &image).await;
    assert_denied(&v, "is not supported by this version of pullgate");
    // The public-good url means the built-in public-good trust (Fulcio, CT and Rekor), which
    // does not trust this signature's test Rekor (nor its CA).
    let public = keyless_cip(
        &glob,
        &format!("url: \"https://fulcio.sigstore.dev\", {identity}"),
        "",
    );
    let v = verify(&[("cip.yaml", &public)], &image).await;
    assert_denied(&v, "not a trusted transparency log");
}

/// A keyless authority trusting a TrustRoot whose Fulcio, CT log and Rekor come from a TUF
/// repository: `repository` (mirrorFS, offline) and `remote` (served on loopback).
#[tokio::test(flavor = "multi_thread")]
async fn tuf_trust_roots_repository_and_remote() {
    use common::tuf::{trusted_root_json, TufFaults, TufRepo, TufServer};
    let reg = Registry::start().await;
    let fulcio = TestFulcio::new("tuf-fulcio");
    let rekor = TestRekor::new();
    let glob = format!("{}/**", reg.addr());
    let identity = format!("identities: [{{issuer: \"{ISSUER}\", subject: \"{WORKFLOW}\"}}]");
    let digest = reg.push_image("app", "v1", "keyless-tuf").await;
    sign_keyless(
        &reg,
        "app",
        &digest,
        &fulcio,
        &Leaf::default(),
        Some((&rekor, now())),
    )
    .await;
    let image = reg.tag_ref("app", "v1");
    let cip = keyless_cip(
        &glob,
        &format!("trustRootRef: tuf, {identity}"),
        "    ctlog: {trustRootRef: tuf}\n",
    );
    let trusted_root = trusted_root_json(&fulcio, &rekor.public_der());

    // repository: verified offline from mirrorFS; the signature chains to its Fulcio and its
    // Rekor entry is signed by its log.
    let repo = TufRepo::new(&trusted_root, &TufFaults::default());
    let tr = repo.repository_trust_root("tuf");
    let v = verify(&[("tr.yaml", &tr), ("cip.yaml", &cip)], &image).await;
    assert_allowed(&v);
    assert!(
        v.json["policies"][0]["authorities"][0]["evidence"]["tlog"]["integrated_time"]
            .as_i64()
            .is_some(),
        "{}",
        v.json
    );
    // Same trust, wrong identity: denied for the identity.
    let wrong = keyless_cip(
        &glob,
        "trustRootRef: tuf, identities: [{issuer: \"https://accounts.google.com\", subject: x}]",
        "",
    );
    assert_denied(
        &verify(&[("tr.yaml", &tr), ("cip.yaml", &wrong)], &image).await,
        "certificate identity did not match",
    );
    // Without the TUF trust the signature's CA is unknown: the allow above came from it.
    let other = TufRepo::new(
        &trusted_root_json(&TestFulcio::new("other"), &rekor.public_der()),
        &TufFaults::default(),
    );
    let v = verify(
        &[
            ("tr.yaml", &other.repository_trust_root("tuf")),
            ("cip.yaml", &cip),
        ],
        &image,
    )
    .await;
    assert_eq!(v.verdict(), "deny", "{}", v.json);

    // A tampered target and an expired timestamp fail closed, naming the cause.
    let tampered = TufRepo::new(
        &trusted_root,
        &TufFaults {
            tampered_target: true,
            ..Default::default()
        },
    );
    let v = verify(
        &[
            ("tr.yaml", &tampered.repository_trust_root("tuf")),
            ("cip.yaml", &cip),
        ],
        &image,
    )
    .await;
    assert_denied(
        &v,
        "trusted_root.json: hash does not match the one recorded in 1.targets.json",
    );
    let expired = TufRepo::new(
        &trusted_root,
        &TufFaults {
            expired_timestamp: true,
            ..Default::default()
        },
    );
    let v = verify(
        &[
            ("tr.yaml", &expired.repository_trust_root("tuf")),
            ("cip.yaml", &cip),
        ],
        &image,
    )
    .await;
    assert_denied(&v, "spec.repository (TUF): timestamp.json: expired at");

    // remote: the same repository served over loopback HTTP, fetched once per verify.
    let server = TufServer::start(&repo.repository()).await;
    let tr = repo.remote_trust_root("tuf", &server.url());
    assert_allowed(&verify(&[("tr.yaml", &tr), ("cip.yaml", &cip)], &image).await);
    assert_eq!(server.count("/timestamp.json"), 1);
    assert_eq!(server.count("/2.root.json"), 1);
    assert_eq!(server.count("/1.targets.json"), 1);
    server.stop();
    // With the mirror gone and nothing verified before, the TrustRoot denies with the reason.
    let v = verify(&[("tr.yaml", &tr), ("cip.yaml", &cip)], &image).await;
    assert_denied(&v, "2.root.json: could not be fetched");
}
