//! `pullgate serve`, the CRI proxy (`runtime.v1.ImageService` and `runtime.v1.RuntimeService` on
//! one socket), between a CRI client (standing in for kubelet) and a real containerd 1.6, with a
//! real registry (distribution 2.8) and cosign signatures made by the sigstore crate.
//!
//! Each test starts its own registry, containerd and pullgate (all in temp dirs, stopped on
//! drop) and uses its own repositories and seeds.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use k8s_cri::v1::{FilesystemUsage, Image};
use serde_json::Value;
use tonic::{Code, Status};

/// The enforced namespace (labelled `policy.sigstore.dev/include: "true"`).
const PROD: &str = "prod";
const DENY_PREFIX: &str = "SignatureValidationFailed: ";

/// `prod` and `kube-system` labelled include=true, `dev` without labels.
fn namespaces_yaml() -> String {
    let mut out = String::new();
    for (name, include) in [(PROD, true), ("kube-system", true), ("dev", false)] {
        out.push_str(&format!(
            "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n"
        ));
        if include {
            out.push_str("  labels:\n    policy.sigstore.dev/include: \"true\"\n");
        }
    }
    out
}

/// A ClusterImagePolicy covering `glob` with one key authority (key inline in `key.data`).
fn key_cip(name: &str, glob: &str, pem: &str) -> String {
    format!(
        "---\napiVersion: policy.sigstore.dev/v1beta1\nkind: ClusterImagePolicy\nmetadata:\n  name: {name}\nspec:\n  images:\n  - glob: \"{glob}\"\n  authorities:\n  - key:\n      data: {}\n",
        serde_json::to_string(pem).unwrap()
    )
}

/// A ClusterImagePolicy covering `glob` with a `static` authority (`pass` or `fail`).
fn static_cip(name: &str, glob: &str, action: &str) -> String {
    format!(
        "---\napiVersion: policy.sigstore.dev/v1beta1\nkind: ClusterImagePolicy\nmetadata:\n  name: {name}\nspec:\n  images:\n  - glob: \"{glob}\"\n  authorities:\n  - static:\n      action: {action}\n"
    )
}

/// Writes `dir/name` through a dot-file and a rename, as a config sync would: pullgate never
/// sees a half-written file.
fn write_atomically(dir: &Path, name: &str, contents: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    fs::write(&tmp, contents).expect("write temp policy file");
    fs::rename(&tmp, dir.join(name)).expect("rename policy file");
}

/// `(config digest, layer digests)` of the manifest at `repo:reference` in `reg`.
async fn manifest_blobs(reg: &Registry, repo: &str, reference: &str) -> (String, Vec<String>) {
    let bytes = reg
        .manifest_bytes(repo, reference)
        .await
        .unwrap_or_else(|| panic!("no manifest {repo}:{reference}"));
    let manifest: Value = serde_json::from_slice(&bytes).expect("manifest JSON");
    let config = manifest["config"]["digest"]
        .as_str()
        .expect("config digest")
        .to_string();
    let layers = manifest["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| l["digest"].as_str().expect("layer digest").to_string())
        .collect();
    (config, layers)
}

/// Lines of the registry's raw access log written by containerd (user agent `containerd/…`).
fn containerd_requests(reg: &Registry) -> Vec<String> {
    fs::read_to_string(reg.dir().join("access.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("\"containerd/"))
        .map(str::to_string)
        .collect()
}

/// True for an access-log line asking for `repo:tag` by tag (containerd adds `?ns=HOST` when it
/// pulls through a `hosts.toml` server).
fn is_tag_lookup(line: &str, repo: &str, tag: &str) -> bool {
    let path = format!("/v2/{repo}/manifests/{tag}");
    line.contains(&format!("{path} ")) || line.contains(&format!("{path}?"))
}

/// Asserts a CRI denial as kubelet expects it and returns its message.
fn expect_denied(result: Result<String, Status>, what: &str, pg: &Pullgate) -> String {
    match result {
        Ok(image_ref) => panic!(
            "{what}: pulled ({image_ref}) but should be denied\n--- pullgate\n{}",
            pg.log()
        ),
        Err(status) => {
            assert_eq!(
                status.code(),
                Code::Unknown,
                "{what}: {status:?}\n--- pullgate\n{}",
                pg.log()
            );
            assert!(
                status.message().starts_with(DENY_PREFIX),
                "{what}: message must start with {DENY_PREFIX:?}: {:?}",
                status.message()
            );
            status.message().to_string()
        }
    }
}

fn expect_pulled(result: Result<String, Status>, what: &str, pg: &Pullgate) -> String {
    result.unwrap_or_else(|s| panic!("{what}: {s:?}\n--- pullgate\n{}", pg.log()))
}

/// CRI `ImageStatus` on `sock`, retried for up to 2 s while the image is not found (the CRI
/// plugin adopts image records created through the images API from its event stream).
async fn status_eventually(sock: &Path, image: &str) -> Option<Image> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let found = image_status(sock, image)
            .await
            .unwrap_or_else(|e| panic!("ImageStatus {image} on {}: {e:?}", sock.display()));
        if found.is_some() || Instant::now() >= deadline {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Checks the fields every audit record must carry and returns `verdict`.
fn check_audit_record(rec: &Value) -> String {
    assert_eq!(rec["source"], "cri-pull", "{rec}");
    for field in ["namespace", "pod", "image", "verdict"] {
        assert!(rec[field].is_string(), "audit field {field} missing: {rec}");
    }
    assert!(
        rec["digest"].is_string() || rec["digest"].is_null(),
        "audit field digest: {rec}"
    );
    assert!(rec["reasons"].is_array(), "audit field reasons: {rec}");
    assert!(
        rec["cache_hit"].is_boolean(),
        "audit field cache_hit: {rec}"
    );
    assert!(
        rec["latency_ms"].is_number(),
        "audit field latency_ms: {rec}"
    );
    let verdict = rec["verdict"].as_str().unwrap().to_string();
    assert!(
        ["allow", "deny", "warn", "error"].contains(&verdict.as_str()),
        "{rec}"
    );
    verdict
}

// ---------------------------------------------------------------------------------------------

/// The harness itself, without pullgate: containerd pulls from the registry over plain HTTP,
/// records the image under tag, `repo@digest` and config id, keeps the blobs, survives a
/// restart. Calibrates what the other tests assert about containerd.
#[tokio::test(flavor = "multi_thread")]
async fn harness_containerd_pulls_directly() {
    let reg = Registry::start().await;
    let mut ctd = Containerd::start().await;
    // The binary PULLGATE_TEST_CONTAINERD names (else Debian's) is the one that runs.
    let version = &ctd.binary().version;
    assert!(
        ctd.log().contains(&format!("version={version}"))
            || ctd.log().contains(&format!("version=\"{version}\"")),
        "containerd {version} from {} not in its log\n--- containerd\n{}",
        ctd.binary().path.display(),
        ctd.log()
    );
    let digest = reg.push_image("t0/app", "v1", "cri-t0").await;
    let (config, layers) = manifest_blobs(&reg, "t0/app", "v1").await;
    let image = reg.tag_ref("t0/app", "v1");

    let image_ref = pull(&ctd.socket(), &image, Some("dev"), "pod-0")
        .await
        .unwrap_or_else(|e| panic!("direct pull: {e:?}\n--- containerd\n{}", ctd.log()));
    assert_eq!(image_ref, config);

    let targets = ctd.image_targets().await;
    assert_eq!(targets.get(&image), Some(&digest), "{targets:?}");
    assert_eq!(
        targets.get(&reg.digest_ref("t0/app", &digest)),
        Some(&digest),
        "{targets:?}"
    );
    assert_eq!(targets.get(&config), Some(&digest), "{targets:?}");

    let content = ctd.content_digests().await;
    for blob in [&digest, &config, &layers[0]] {
        assert!(content.contains(blob), "{blob} not in {content:?}");
    }
    assert!(ctd.blobs_on_disk().contains(&layers[0]));
    assert!(
        !containerd_requests(&reg).is_empty(),
        "containerd's requests are recognised by user agent"
    );

    let status = image_status(&ctd.socket(), &image).await.unwrap().unwrap();
    assert_eq!(status.id, config);
    assert!(status.repo_tags.contains(&image), "{status:?}");

    ctd.restart().await;
    let status = image_status(&ctd.socket(), &image).await.unwrap().unwrap();
    assert_eq!(status.id, config, "image survives a containerd restart");
    let missing = image_status(&ctd.socket(), &reg.tag_ref("t0/app", "nope"))
        .await
        .unwrap();
    assert!(missing.is_none());
    eprintln!("snapshotter: {}", ctd.snapshotter());
}

/// 1. A signed image in an enforced namespace is pulled through pullgate, pinned to the
///    verified digest; ImageStatus (tag and digest) and ListImages through pullgate show it.
#[tokio::test(flavor = "multi_thread")]
async fn signed_image_is_pulled_through_pullgate() {
    let reg = Registry::start().await;
    let ctd = Containerd::start().await;
    let repo = "t1/app";
    let digest = reg.push_image(repo, "v1", "cri-t1").await;
    let key = TestKey::generate(KeyKind::EcdsaP256);
    reg.sign(repo, &digest, &key).await;
    let (config, layers) = manifest_blobs(&reg, repo, "v1").await;
    let policy = write_policy_dir(&[
        ("namespaces.yaml", &namespaces_yaml()),
        (
            "cip.yaml",
            &key_cip(
                "t1-signed",
                &format!("{}/t1/**", reg.addr()),
                &key.public_pem(),
            ),
        ),
    ]);
    let pg = Pullgate::start(&ctd.socket(), policy.path(), &["--node-name", "node-t1"]).await;
    let mode = fs::metadata(pg.socket()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "socket mode {mode:o}");

    let image = reg.tag_ref(repo, "v1");
    let by_digest = reg.digest_ref(repo, &digest);
    let image_ref = expect_pulled(
        pull(&pg.socket(), &image, Some(PROD), "web-0").await,
        "pull",
        &pg,
    );
    assert_eq!(
        image_ref, config,
        "image_ref is containerd's: sha256:<config digest>"
    );

    // containerd's own view: same id; the tag and the digest name point at the verified digest.
    let direct = status_eventually(&ctd.socket(), &image)
        .await
        .expect("containerd knows the tag");
    assert_eq!(direct.id, image_ref);
    let targets = ctd.image_targets().await;
    assert_eq!(targets.get(&image), Some(&digest), "{targets:?}");
    assert_eq!(targets.get(&by_digest), Some(&digest), "{targets:?}");
    assert!(ctd.content_digests().await.contains(&layers[0]));

    // Pinned: containerd itself never asked the registry for the tag.
    let tag_lookups: Vec<String> = containerd_requests(&reg)
        .into_iter()
        .filter(|l| is_tag_lookup(l, repo, "v1"))
        .collect();
    assert!(
        tag_lookups.is_empty(),
        "containerd resolved the tag itself: {tag_lookups:#?}"
    );

    // Through pullgate.
    let via_tag = image_status(&pg.socket(), &image)
        .await
        .unwrap()
        .expect("ImageStatus(tag) through pullgate");
    assert_eq!(via_tag.id, image_ref);
    assert!(via_tag.repo_tags.contains(&image), "{via_tag:?}");
    assert!(via_tag.repo_digests.contains(&by_digest), "{via_tag:?}");
    assert_eq!(via_tag, direct);
    let via_digest = image_status(&pg.socket(), &by_digest)
        .await
        .unwrap()
        .expect("ImageStatus(repo@digest) through pullgate");
    assert_eq!(via_digest, via_tag);
    let listed = list_images(&pg.socket()).await.unwrap();
    let entry = listed
        .iter()
        .find(|i| i.id == image_ref)
        .unwrap_or_else(|| panic!("{image_ref} not listed: {listed:?}"));
    assert!(entry.repo_tags.contains(&image), "{entry:?}");

    let records = pg.wait_audit_records(1, Duration::from_secs(5)).await;
    assert_eq!(records.len(), 1, "{records:#?}");
    let rec = &records[0];
    assert_eq!(check_audit_record(rec), "allow", "{rec}");
    assert_eq!(rec["namespace"], PROD);
    assert_eq!(rec["pod"], "web-0");
    assert_eq!(rec["digest"], digest.as_str());
    assert!(rec["image"].as_str().unwrap().contains("t1/app"), "{rec}");
}

/// 2. An unsigned image, and an image no policy covers, are denied the way kubelet expects, and
///    containerd fetches nothing of them.
#[tokio::test(flavor = "multi_thread")]
async fn unsigned_and_unmatched_images_are_denied_and_never_fetched() {
    let reg = Registry::start().await;
    let ctd = Containerd::start().await;
    let digest = reg.push_image("t2/app", "v1", "cri-t2-unsigned").await;
    let other = reg.push_image("t2other/app", "v1", "cri-t2-other").await;
    let key = TestKey::generate(KeyKind::EcdsaP256);
    let (config, layers) = manifest_blobs(&reg, "t2/app", "v1").await;
    let (other_config, other_layers) = manifest_blobs(&reg, "t2other/app", "v1").await;
    let policy = write_policy_dir(&[
        ("namespaces.yaml", &namespaces_yaml()),
        (
            "cip.yaml",
            &key_cip(
                "t2-signed",
                &format!("{}/t2/**", reg.addr()),
                &key.public_pem(),
            ),
        ),
    ]);
    let pg = Pullgate::start(&ctd.socket(), policy.path(), &[]).await;
    let blobs_before = ctd.blobs_on_disk();

    let msg = expect_denied(
        pull(
            &pg.socket(),
            &reg.tag_ref("t2/app", "v1"),
            Some(PROD),
            "web-0",
        )
        .await,
        "unsigned",
        &pg,
    );
    assert!(msg.contains("failed policy: t2-signed"), "{msg}");
    assert!(
        msg.contains(&digest),
        "the message names the digest checked: {msg}"
    );

    let msg = expect_denied(
        pull(
            &pg.socket(),
            &reg.tag_ref("t2other/app", "v1"),
            Some(PROD),
            "web-1",
        )
        .await,
        "no policy",
        &pg,
    );
    assert!(msg.contains("no matching policies"), "{msg}");

    // Nothing of either image reached containerd.
    let content = ctd.content_digests().await;
    for blob in [
        &digest,
        &config,
        &layers[0],
        &other,
        &other_config,
        &other_layers[0],
    ] {
        assert!(
            !content.contains(blob),
            "{blob} in containerd's content store"
        );
    }
    assert_eq!(
        ctd.blobs_on_disk(),
        blobs_before,
        "no blob or ingest on disk"
    );
    let names = ctd.image_names().await;
    assert!(
        !names.iter().any(|n| n.contains("/t2")),
        "image records: {names:?}"
    );
    let asked = containerd_requests(&reg);
    assert!(
        asked.is_empty(),
        "containerd contacted the registry: {asked:#?}"
    );
    assert!(image_status(&pg.socket(), &reg.tag_ref("t2/app", "v1"))
        .await
        .unwrap()
        .is_none());

    let records = pg.wait_audit_records(2, Duration::from_secs(5)).await;
    assert_eq!(records.len(), 2, "{records:#?}");
    for rec in &records {
        assert_eq!(check_audit_record(rec), "deny", "{rec}");
        assert!(
            !rec["reasons"].as_array().unwrap().is_empty(),
            "a denial has reasons: {rec}"
        );
        assert_eq!(rec["namespace"], PROD);
    }
    assert_eq!(records[0]["digest"], digest.as_str());
    assert_eq!(records[0]["pod"], "web-0");
    assert_eq!(records[1]["pod"], "web-1");
}

/// 3. Enforcement follows namespace labels; kube-system is exempt by default, and
///    `--no-default-exemptions` drops that default (`--exempt-namespace` adds to it).
#[tokio::test(flavor = "multi_thread")]
async fn namespace_scope_and_exemptions() {
    let reg = Registry::start().await;
    let ctd = Containerd::start().await;
    let key = TestKey::generate(KeyKind::EcdsaP256);
    reg.push_image("t3/app", "v1", "cri-t3-unsigned").await;
    let image = reg.tag_ref("t3/app", "v1");
    let policy = write_policy_dir(&[
        ("namespaces.yaml", &namespaces_yaml()),
        (
            "cip.yaml",
            &key_cip(
                "t3-signed",
                &format!("{}/t3/**", reg.addr()),
                &key.public_pem(),
            ),
        ),
    ]);

    let pg = Pullgate::start(&ctd.socket(), policy.path(), &[]).await;
    for ns in ["dev", "not-in-the-policy-dir", "kube-system"] {
        expect_pulled(
            pull(&pg.socket(), &image, Some(ns), "p").await,
            &format!("unsigned image in {ns}"),
            &pg,
        );
    }
    expect_denied(
        pull(&pg.socket(), &image, Some(PROD), "p").await,
        "prod",
        &pg,
    );
    let records = pg.wait_audit_records(4, Duration::from_secs(5)).await;
    let seen: Vec<(String, String)> = records
        .iter()
        .map(|r| {
            let verdict = check_audit_record(r);
            (r["namespace"].as_str().unwrap().to_string(), verdict)
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("dev".to_string(), "allow".to_string()),
            ("not-in-the-policy-dir".into(), "allow".into()),
            ("kube-system".into(), "allow".into()),
            (PROD.into(), "deny".into()),
        ]
    );
    drop(pg);

    // Without the default exemption: kube-system (labelled include=true) is now enforced.
    let pg = Pullgate::start(
        &ctd.socket(),
        policy.path(),
        &[
            "--no-default-exemptions",
            "--exempt-namespace",
            "other-system",
        ],
    )
    .await;
    let msg = expect_denied(
        pull(&pg.socket(), &image, Some("kube-system"), "p").await,
        "kube-system without the default exemption",
        &pg,
    );
    assert!(msg.contains("failed policy: t3-signed"), "{msg}");
    expect_pulled(
        pull(&pg.socket(), &image, Some("dev"), "p").await,
        "dev is still not enforced",
        &pg,
    );
    drop(pg);

    // opt-out scope: every namespace not labelled exclude=true is enforced.
    let pg = Pullgate::start(&ctd.socket(), policy.path(), &["--scope", "opt-out"]).await;
    expect_denied(
        pull(&pg.socket(), &image, Some("dev"), "p").await,
        "dev under --scope opt-out",
        &pg,
    );
    expect_pulled(
        pull(&pg.socket(), &image, Some("kube-system"), "p").await,
        "kube-system stays exempt under opt-out",
        &pg,
    );
}

/// 4. The tag moves to an unsigned image after a verified pull: the next pull is denied, and
///    containerd's record of the tag still names the verified digest.
#[tokio::test(flavor = "multi_thread")]
async fn moved_tag_is_denied_and_record_keeps_verified_digest() {
    let reg = Registry::start().await;
    let ctd = Containerd::start().await;
    let repo = "t4/app";
    let key = TestKey::generate(KeyKind::EcdsaP256);
    let good = reg.push_image(repo, "v1", "cri-t4-good").await;
    reg.sign(repo, &good, &key).await;
    let (good_config, _) = manifest_blobs(&reg, repo, &good).await;
    let policy = write_policy_dir(&[
        ("namespaces.yaml", &namespaces_yaml()),
        (
            "cip.yaml",
            &key_cip(
                "t4-signed",
                &format!("{}/t4/**", reg.addr()),
                &key.public_pem(),
            ),
        ),
    ]);
    let pg = Pullgate::start(&ctd.socket(), policy.path(), &[]).await;
    let image = reg.tag_ref(repo, "v1");

    let first = expect_pulled(
        pull(&pg.socket(), &image, Some(PROD), "p").await,
        "v1 → good",
        &pg,
    );
    assert_eq!(first, good_config);
    assert_eq!(ctd.image_targets().await.get(&image), Some(&good));

    let evil = reg.push_image(repo, "evil", "cri-t4-evil").await;
    let (evil_config, evil_layers) = manifest_blobs(&reg, repo, &evil).await;
    reg.tag(repo, &evil, "v1").await;
    let msg = expect_denied(
        pull(&pg.socket(), &image, Some(PROD), "p").await,
        "v1 → unsigned",
        &pg,
    );
    assert!(
        msg.contains(&evil),
        "names the digest the tag now resolves to: {msg}"
    );

    let targets = ctd.image_targets().await;
    assert_eq!(targets.get(&image), Some(&good), "{targets:?}");
    assert!(!targets.values().any(|t| t == &evil), "{targets:?}");
    let content = ctd.content_digests().await;
    for blob in [&evil, &evil_config, &evil_layers[0]] {
        assert!(!content.contains(blob), "{blob} fetched");
    }
    let status = image_status(&pg.socket(), &image).await.unwrap().unwrap();
    assert_eq!(status.id, good_config);
}

/// 4b. containerd sees a different registry than pullgate for the same name (certs.d
///     `hosts.toml` points it at a second registry where the tag names an unsigned image): the
///     image pullgate verified is the one containerd pulls, because the pull is pinned.
#[tokio::test(flavor = "multi_thread")]
async fn pull_is_pinned_when_containerd_would_resolve_the_tag_elsewhere() {
    let reg = Registry::start().await;
    let shadow = Registry::start().await;
    let ctd = Containerd::start().await;
    let repo = "t4b/app";
    let key = TestKey::generate(KeyKind::EcdsaP256);
    let good = reg.push_image(repo, "v1", "cri-t4b-good").await;
    reg.sign(repo, &good, &key).await;
    let (good_config, good_layers) = manifest_blobs(&reg, repo, &good).await;
    // The shadow registry holds the good image too (same seed, same digest), but its v1 is evil.
    assert_eq!(shadow.push_image(repo, "good", "cri-t4b-good").await, good);
    let evil = shadow.push_image(repo, "v1", "cri-t4b-evil").await;
    let (evil_config, evil_layers) = manifest_blobs(&shadow, repo, &evil).await;
    ctd.write_hosts_toml(&reg.addr(), &shadow.url());

    let policy = write_policy_dir(&[
        ("namespaces.yaml", &namespaces_yaml()),
        (
            "cip.yaml",
            &key_cip(
                "t4b-signed",
                &format!("{}/t4b/**", reg.addr()),
                &key.public_pem(),
            ),
        ),
    ]);
    let pg = Pullgate::start(&ctd.socket(), policy.path(), &[]).await;
    let image = reg.tag_ref(repo, "v1");
    let image_ref = expect_pulled(
        pull(&pg.socket(), &image, Some(PROD), "p").await,
        "pinned pull",
        &pg,
    );
    assert_eq!(
        image_ref, good_config,
        "containerd pulled the verified image"
    );
    assert!(
        containerd_requests(&reg).is_empty(),
        "containerd used hosts.toml, not the original registry"
    );
    assert!(
        !containerd_requests(&shadow).is_empty(),
        "containerd fetched from the shadow registry"
    );
    assert!(
        !containerd_requests(&shadow)
            .iter()
            .any(|l| is_tag_lookup(l, repo, "v1")),
        "containerd resolved the tag: {:#?}",
        containerd_requests(&shadow)
    );
    let targets = ctd.image_targets().await;
    assert_eq!(targets.get(&image), Some(&good), "{targets:?}");
    let content = ctd.content_digests().await;
    assert!(content.contains(&good_layers[0]));
    for blob in [&evil, &evil_config, &evil_layers[0]] {
        assert!(!content.contains(blob), "{blob} fetched");
    }
    let status = status_eventually(&pg.socket(), &image).await.unwrap();
    assert_eq!(status.id, good_config);

    // Control: the same pull straight to containerd gets the evil image, so the set-up is real.
    let direct = pull(&ctd.socket(), &image, Some(PROD), "p").await.unwrap();
    assert_eq!(direct, evil_config);
}

fn sorted_images(mut images: Vec<Image>) -> Vec<Image> {
    for i in &mut images {
        i.repo_tags.sort();
        i.repo_digests.sort();
    }
    images.sort_by(|a, b| a.id.cmp(&b.id));
    images
}

fn fs_ids(usage: &[FilesystemUsage]) -> Vec<String> {
    usage
        .iter()
        .map(|u| {
            u.fs_id
                .as_ref()
                .map(|f| f.mountpoint.clone())
                .unwrap_or_default()
        })
        .collect()
}

/// 5. RPCs pullgate does not inspect give containerd's answers (errors included).
#[tokio::test(flavor = "multi_thread")]
async fn other_image_rpcs_are_forwarded_unchanged() {
    let reg = Registry::start().await;
    let ctd = Containerd::start().await;
    let key = TestKey::generate(KeyKind::EcdsaP256);
    let mut digests = BTreeMap::new();
    for (repo, seed) in [("t5/one", "cri-t5-one"), ("t5/two", "cri-t5-two")] {
        let d = reg.push_image(repo, "v1", seed).await;
        reg.sign(repo, &d, &key).await;
        digests.insert(repo, d);
    }
    let policy = write_policy_dir(&[
        ("namespaces.yaml", &namespaces_yaml()),
        (
            "cip.yaml",
            &key_cip(
                "t5-signed",
                &format!("{}/t5/**", reg.addr()),
                &key.public_pem(),
            ),
        ),
    ]);
    let pg = Pullgate::start(&ctd.socket(), policy.path(), &[]).await;
    let (via, direct) = (pg.socket(), ctd.socket());
    let one = reg.tag_ref("t5/one", "v1");
    let two = reg.tag_ref("t5/two", "v1");
    let one_ref = expect_pulled(pull(&via, &one, Some(PROD), "p").await, "one", &pg);
    expect_pulled(pull(&via, &two, Some(PROD), "p").await, "two", &pg);
    status_eventually(&direct, &two)
        .await
        .expect("two recorded");

    let (a, b) = (
        list_images(&via).await.unwrap(),
        list_images(&direct).await.unwrap(),
    );
    assert_eq!(sorted_images(a), sorted_images(b));

    let queries = [
        one.clone(),
        reg.digest_ref("t5/one", &digests["t5/one"]),
        one_ref.clone(),
        reg.tag_ref("t5/one", "missing"),
        "127.0.0.1:1/nowhere/none:v1".to_string(),
        "Not A Reference!".to_string(),
        // With two images present containerd answers "ambiguous digest string": an error.
        String::new(),
    ];
    for q in &queries {
        for verbose in [false, true] {
            let a = image_status_response(&via, q, verbose).await;
            let b = image_status_response(&direct, q, verbose).await;
            assert_eq!(
                status_parts(&a),
                status_parts(&b),
                "ImageStatus({q:?}) error"
            );
            if let (Ok(a), Ok(b)) = (a, b) {
                assert_eq!(a, b, "ImageStatus({q:?}, verbose {verbose})");
            }
        }
    }

    let (a, b) = (
        image_fs_info(&via).await.unwrap(),
        image_fs_info(&direct).await.unwrap(),
    );
    assert!(!b.image_filesystems.is_empty(), "{b:?}");
    assert_eq!(fs_ids(&a.image_filesystems), fs_ids(&b.image_filesystems));
    assert_eq!(
        fs_ids(&a.container_filesystems),
        fs_ids(&b.container_filesystems)
    );

    assert!(
        image_status(&direct, "").await.is_err(),
        "an error answer is compared too"
    );

    // Errors of RemoveImage come back unchanged ("" is ambiguous with two images).
    let (a, b) = (
        remove_image(&via, "").await,
        remove_image(&direct, "").await,
    );
    assert!(b.is_err(), "{b:?}");
    assert_eq!(status_parts(&a), status_parts(&b), "RemoveImage(\"\")");

    // RemoveImage through pullgate removes it from containerd.
    remove_image(&via, &two).await.unwrap();
    assert!(image_status(&direct, &two).await.unwrap().is_none());
    assert!(!ctd.image_names().await.contains(&two));
    for q in [
        two.as_str(),
        "127.0.0.1:1/nowhere/none:v1",
        "Not A Reference!",
    ] {
        let a = remove_image(&via, q).await;
        let b = remove_image(&direct, q).await;
        assert_eq!(status_parts(&a), status_parts(&b), "RemoveImage({q:?})");
    }
    let (a, b) = (
        list_images(&via).await.unwrap(),
        list_images(&direct).await.unwrap(),
    );
    assert_eq!(sorted_images(a.clone()), sorted_images(b));
    assert!(a.iter().any(|i| i.id == one_ref));
    assert!(!a.iter().any(|i| i.repo_tags.contains(&two)));
}

/// 6. containerd restarts under a running pullgate; pullgate restarts on the same socket.
#[tokio::test(flavor = "multi_thread")]
async fn survives_containerd_and_own_restart() {
    let reg = Registry::start().await;
    let mut ctd = Containerd::start().await;
    let key = TestKey::generate(KeyKind::EcdsaP256);
    let mut images = Vec::new();
    for n in 1..=3 {
        let repo = format!("t6/app{n}");
        let d = reg.push_image(&repo, "v1", &format!("cri-t6-{n}")).await;
        reg.sign(&repo, &d, &key).await;
        images.push(reg.tag_ref(&repo, "v1"));
    }
    let policy = write_policy_dir(&[
        ("namespaces.yaml", &namespaces_yaml()),
        (
            "cip.yaml",
            &key_cip(
                "t6-signed",
                &format!("{}/t6/**", reg.addr()),
                &key.public_pem(),
            ),
        ),
    ]);
    let mut pg = Pullgate::start(&ctd.socket(), policy.path(), &[]).await;
    expect_pulled(
        pull(&pg.socket(), &images[0], Some(PROD), "p").await,
        "before",
        &pg,
    );

    ctd.restart().await;
    expect_pulled(
        pull(&pg.socket(), &images[1], Some(PROD), "p").await,
        "first pull after containerd restarted",
        &pg,
    );
    assert!(image_status(&pg.socket(), &images[0])
        .await
        .unwrap()
        .is_some());

    let pid = pg.pid().unwrap();
    let exit = pg.stop();
    assert!(
        exit.is_some(),
        "pullgate (pid {pid}) did not exit within 10 s of SIGTERM\n{}",
        pg.log()
    );
    pg.restart().await;
    expect_pulled(
        pull(&pg.socket(), &images[2], Some(PROD), "p").await,
        "after pullgate restarted",
        &pg,
    );
    assert!(image_status(&pg.socket(), &images[1])
        .await
        .unwrap()
        .is_some());

    let records = pg.wait_audit_records(3, Duration::from_secs(5)).await;
    assert_eq!(
        records.len(),
        3,
        "audit log kept across the restart: {records:#?}"
    );
    for rec in &records {
        assert_eq!(check_audit_record(rec), "allow");
    }
}

/// 7. One audit line per decision; 100 concurrent pulls of one image verify it once.
#[tokio::test(flavor = "multi_thread")]
async fn audit_log_and_concurrent_pulls() {
    const PULLS: usize = 100;
    let reg = Registry::start().await;
    let ctd = Containerd::start().await;
    let key = TestKey::generate(KeyKind::EcdsaP256);
    let repo = "t7/app";
    let digest = reg.push_image(repo, "v1", "cri-t7").await;
    reg.sign(repo, &digest, &key).await;
    let bad = reg.push_image("t7/bad", "v1", "cri-t7-bad").await;
    let policy = write_policy_dir(&[
        ("namespaces.yaml", &namespaces_yaml()),
        (
            "cip.yaml",
            &key_cip(
                "t7-signed",
                &format!("{}/t7/**", reg.addr()),
                &key.public_pem(),
            ),
        ),
    ]);
    let pg = Pullgate::start(&ctd.socket(), policy.path(), &[]).await;
    let image = reg.tag_ref(repo, "v1");
    let mark = reg.request_count().await;

    let client = cri_client(&pg.socket()).await.unwrap();
    let started = Instant::now();
    let tasks: Vec<_> = (0..PULLS)
        .map(|i| {
            let mut client = client.clone();
            let req = pull_request(&image, Some(PROD), &format!("pod-{i}"));
            tokio::spawn(async move {
                client
                    .pull_image(req)
                    .await
                    .map(|r| r.into_inner().image_ref)
            })
        })
        .collect();
    let mut refs = BTreeSet::new();
    for t in tasks {
        let r = t.await.expect("pull task");
        refs.insert(expect_pulled(r, "concurrent pull", &pg));
    }
    eprintln!("{PULLS} concurrent pulls: {:?}", started.elapsed());
    assert_eq!(refs.len(), 1, "{refs:?}");

    let records = pg.wait_audit_records(PULLS, Duration::from_secs(10)).await;
    assert_eq!(records.len(), PULLS, "one line per decision");
    let mut pods = BTreeSet::new();
    for rec in &records {
        assert_eq!(check_audit_record(rec), "allow", "{rec}");
        assert_eq!(rec["digest"], digest.as_str(), "{rec}");
        assert_eq!(rec["namespace"], PROD);
        pods.insert(rec["pod"].as_str().unwrap().to_string());
    }
    assert_eq!(pods.len(), PULLS, "every pull audited once");
    assert!(
        records.iter().any(|r| r["cache_hit"] == false),
        "the first decision is not a cache hit"
    );

    let requests = reg.requests_since(mark).await;
    let sig_tag = signature_tag(&digest);
    let sig_path = format!("/v2/{repo}/manifests/{sig_tag}");
    let sig_gets = requests
        .iter()
        .filter(|(m, u)| m == "GET" && u == &sig_path)
        .count();
    let sig_any = requests.iter().filter(|(_, u)| u == &sig_path).count();
    eprintln!(
        "{PULLS} pulls: signature manifest {sig_gets} GET / {sig_any} requests; {} registry requests in all",
        requests.len()
    );
    assert!(
        sig_gets <= 1,
        "signature manifest fetched {sig_gets} times for {PULLS} pulls"
    );
    assert!(sig_any >= 1, "signature never looked up: {requests:#?}");

    // A denial adds exactly one line.
    expect_denied(
        pull(
            &pg.socket(),
            &reg.tag_ref("t7/bad", "v1"),
            Some(PROD),
            "bad-pod",
        )
        .await,
        "unsigned",
        &pg,
    );
    let records = pg
        .wait_audit_records(PULLS + 1, Duration::from_secs(5))
        .await;
    assert_eq!(records.len(), PULLS + 1);
    let last = &records[PULLS];
    assert_eq!(check_audit_record(last), "deny");
    assert_eq!(last["pod"], "bad-pod");
    assert_eq!(last["digest"], bad.as_str());
    assert!(!last["reasons"].as_array().unwrap().is_empty());
    for line in pg.audit_lines() {
        assert!(!line.trim().is_empty() && !line.contains('\n'));
    }
}

/// 8. A changed policy file applies to the next pull without restart; an invalid file keeps
///    the last good policies and is logged.
#[tokio::test(flavor = "multi_thread")]
async fn policy_dir_hot_reload() {
    let reg = Registry::start().await;
    let ctd = Containerd::start().await;
    let key = TestKey::generate(KeyKind::EcdsaP256);
    let repo = "t8/app";
    let digest = reg.push_image(repo, "v1", "cri-t8").await;
    reg.sign(repo, &digest, &key).await;
    let glob = format!("{}/t8/**", reg.addr());
    let policy = write_policy_dir(&[
        ("namespaces.yaml", &namespaces_yaml()),
        ("cip.yaml", &static_cip("t8-gate", &glob, "fail")),
    ]);
    let pg = Pullgate::start(&ctd.socket(), policy.path(), &[]).await;
    let image = reg.tag_ref(repo, "v1");

    let msg = expect_denied(
        pull(&pg.socket(), &image, Some(PROD), "p").await,
        "static fail",
        &pg,
    );
    assert!(msg.contains("failed policy: t8-gate"), "{msg}");

    write_atomically(
        policy.path(),
        "cip.yaml",
        &key_cip("t8-gate", &glob, &key.public_pem()),
    );
    let changed = Instant::now();
    loop {
        let err = match pull(&pg.socket(), &image, Some(PROD), "p").await {
            Ok(_) => break,
            Err(e) => e,
        };
        if changed.elapsed() > Duration::from_secs(3) {
            panic!(
                "changed policy not applied within 3 s; last: {err:?}\n--- pullgate\n{}",
                pg.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("reload applied after {:?}", changed.elapsed());

    // Audit lines (copied to stdout) never name a policy file, so any new mention is the reload.
    let mentions = |log: &str| log.matches("cip.yaml").count();
    let before = mentions(&pg.log());
    write_atomically(
        policy.path(),
        "cip.yaml",
        "apiVersion: policy.sigstore.dev/v1beta1\nkind: ClusterImagePolicy\nmetadata: {name: [broken\n",
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while mentions(&pg.log()) <= before {
        if Instant::now() >= deadline {
            panic!(
                "invalid cip.yaml not mentioned in pullgate's log within 5 s\n--- pullgate\n{}",
                pg.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    expect_pulled(
        pull(&pg.socket(), &image, Some(PROD), "p").await,
        "last good policy after an invalid file",
        &pg,
    );
    // Still so once any later reload has had time to happen.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    expect_pulled(
        pull(&pg.socket(), &image, Some(PROD), "p").await,
        "last good policy, later",
        &pg,
    );
}

/// A method pullgate has never heard of reaches containerd, and containerd's answer (here:
/// Unimplemented) comes back unchanged.
#[tokio::test(flavor = "multi_thread")]
async fn unknown_methods_are_forwarded() {
    use pullgate::cri::raw::RawCodec;
    let ctd = Containerd::start().await;
    let policy = write_policy_dir(&[(
        "ns.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n",
    )]);
    let pg = Pullgate::start(&ctd.socket(), policy.path(), &[]).await;
    let call = |sock: std::path::PathBuf| async move {
        let channel = connect_uds(&sock).await.unwrap();
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.unwrap();
        let path = http::uri::PathAndQuery::from_static("/runtime.v1.ImageService/FutureMethod");
        grpc.unary::<_, bytes::Bytes, _>(
            tonic::Request::new(bytes::Bytes::from_static(b"\x0a\x01x")),
            path,
            RawCodec,
        )
        .await
        .map(|r| r.into_inner())
    };
    let via = call(pg.socket()).await;
    let direct = call(ctd.socket()).await;
    assert_eq!(status_parts(&direct), status_parts(&via));
    assert_eq!(direct.unwrap_err().code(), Code::Unimplemented);
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_containerd_socket_is_a_clear_start_up_error() {
    let dir = tempfile::tempdir().unwrap();
    let listen = dir.path().join("pg.sock");
    let audit = dir.path().join("audit.log");
    let out = run_pullgate_async(
        &[
            "serve",
            "--containerd",
            "/nonexistent/containerd.sock",
            "--listen",
            listen.to_str().unwrap(),
            "--policy-dir",
            dir.path().to_str().unwrap(),
            "--audit-log",
            audit.to_str().unwrap(),
        ],
        &[],
    )
    .await;
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(
        out.stderr.contains(
            "containerd socket /nonexistent/containerd.sock does not exist: is containerd running?"
        ),
        "{}",
        out.stderr
    );
    assert!(!listen.exists(), "nothing is served without containerd");
}

/// kubelet's `auth` for a pull is what pullgate uses for the tag lookup and signatures.
#[tokio::test(flavor = "multi_thread")]
async fn pull_credentials_from_kubelet_are_reused() {
    let reg = Registry::start_with_htpasswd(TEST_USER, TEST_PASSWORD).await;
    let digest = reg.push_image("private/app", "v1", "seed-t-auth").await;
    let key = TestKey::generate(KeyKind::EcdsaP256);
    reg.sign("private/app", &digest, &key).await;
    let ctd = Containerd::start().await;
    let policy = write_policy_dir(&[(
        "p.yaml",
        &(namespaces_yaml() + &key_cip("signed", &format!("{}/**", reg.addr()), &key.public_pem())),
    )]);
    let pg = Pullgate::start(&ctd.socket(), policy.path(), &[]).await;
    let image = reg.tag_ref("private/app", "v1");

    let anonymous = pull(&pg.socket(), &image, Some("prod"), "anon").await;
    let err = anonymous.expect_err("no credentials: could not verify");
    assert_eq!(err.code(), Code::Unknown);
    assert!(
        err.message()
            .starts_with("SignatureValidationFailed: could not verify"),
        "{}",
        err.message()
    );

    let mut req = pull_request(&image, Some("prod"), "with-auth");
    req.auth = Some(k8s_cri::v1::AuthConfig {
        username: TEST_USER.to_string(),
        password: TEST_PASSWORD.to_string(),
        ..Default::default()
    });
    let image_ref = pull_with(&pg.socket(), req)
        .await
        .expect("pull with kubelet's credentials");
    assert!(image_ref.starts_with("sha256:"), "{image_ref}");
}

/// CIP-level policies that read the object, at the node: `metadata` (name, namespace, uid,
/// labels, annotations) and `typemeta` come from the pod sandbox config kubelet sends; the
/// pod's `spec` is not in a CRI pull, so a policy that reads it is refused with the reason.
#[tokio::test(flavor = "multi_thread")]
async fn node_policies_read_the_pod_sandbox_metadata_and_refuse_spec() {
    let reg = Registry::start().await;
    let ctd = Containerd::start().await;
    let key = TestKey::generate(KeyKind::EcdsaP256);
    let digest = reg.push_image("t12/app", "v1", "cri-t12").await;
    reg.sign("t12/app", &digest, &key).await;
    let spec_digest = reg.push_image("t12spec/app", "v1", "cri-t12-spec").await;
    reg.sign("t12spec/app", &spec_digest, &key).await;
    let with_policy = |name: &str, glob: &str, flags: &str, rego: &str| {
        format!(
            "{}  policy:\n    type: rego\n{flags}    data: {}\n",
            key_cip(name, glob, &key.public_pem()),
            serde_json::to_string(rego).unwrap()
        )
    };
    let team = with_policy(
        "payments-only",
        &format!("{}/t12/**", reg.addr()),
        "    includeObjectMeta: true\n    includeTypeMeta: true\n",
        "package sigstore\ndefault isCompliant = false\nisCompliant {\n  input.typemeta.kind == \"Pod\"\n  input.metadata.namespace == \"prod\"\n  input.metadata.labels.team == \"payments\"\n  not input.metadata.labels[\"io.kubernetes.pod.name\"]\n}\n",
    );
    let spec = with_policy(
        "needs-spec",
        &format!("{}/t12spec/**", reg.addr()),
        "    includeSpec: true\n",
        "package sigstore\nisCompliant { input.spec.serviceAccountName == \"builder\" }\n",
    );
    let policy = write_policy_dir(&[
        ("namespaces.yaml", &namespaces_yaml()),
        ("team.yaml", &team),
        ("spec.yaml", &spec),
    ]);
    let pg = Pullgate::start(&ctd.socket(), policy.path(), &[]).await;
    let pod = |image: &str, name: &str, team: &str| {
        let mut req = pull_request(image, Some(PROD), name);
        let sandbox = req.sandbox_config.as_mut().unwrap();
        sandbox.labels.insert("team".into(), team.into());
        // kubelet adds these to every sandbox; they are not the pod's labels.
        sandbox
            .labels
            .insert("io.kubernetes.pod.name".into(), name.into());
        req
    };
    let image = reg.tag_ref("t12/app", "v1");

    expect_pulled(
        pull_with(&pg.socket(), pod(&image, "pay-0", "payments")).await,
        "labelled pod",
        &pg,
    );
    // Same image and digest, a pod without the label: denied (verdicts are per object).
    let msg = expect_denied(
        pull_with(&pg.socket(), pod(&image, "web-0", "web")).await,
        "unlabelled pod",
        &pg,
    );
    assert!(
        msg.contains("failed policy: payments-only")
            && msg.contains("failed evaluating cip level policy: policy is not compliant"),
        "{msg}"
    );

    let msg = expect_denied(
        pull_with(
            &pg.socket(),
            pod(&reg.tag_ref("t12spec/app", "v1"), "pay-1", "payments"),
        )
        .await,
        "policy reading the spec",
        &pg,
    );
    assert!(
        msg.contains(
            "failed policy: needs-spec: image 127.0.0.1:"
        ) && msg.contains(
            "failed evaluating cip level policy: includeSpec: the node does not know the pod's spec"
        ),
        "{msg}"
    );
    // Outside enforced namespaces nothing is evaluated.
    expect_pulled(
        pull(
            &pg.socket(),
            &reg.tag_ref("t12spec/app", "v1"),
            Some("dev"),
            "dev-0",
        )
        .await,
        "not enforced",
        &pg,
    );
}

// ---------------------------------------------------------------------------------------------
// RuntimeService (kubelet's containerRuntimeEndpoint) and everything else on the same socket.

/// containerd and a pullgate in front of it, with a policy dir that enforces nothing.
async fn runtime_pair() -> (Containerd, Pullgate, tempfile::TempDir) {
    let ctd = Containerd::start().await;
    let policy = write_policy_dir(&[(
        "ns.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n",
    )]);
    let pg = Pullgate::start(&ctd.socket(), policy.path(), &[]).await;
    (ctd, pg, policy)
}

/// One unary call with raw request bytes on `sock`: the answer's bytes, or its status.
async fn raw_call(sock: &Path, path: &'static str, body: Vec<u8>) -> Result<bytes::Bytes, Status> {
    use pullgate::cri::raw::RawCodec;
    let channel = connect_uds(sock)
        .await
        .map_err(|e| Status::unavailable(format!("connect {}: {e}", sock.display())))?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    grpc.unary(
        tonic::Request::new(bytes::Bytes::from(body)),
        http::uri::PathAndQuery::from_static(path),
        RawCodec,
    )
    .await
    .map(|r| r.into_inner())
}

/// Calls `path` on containerd and through pullgate; asserts the same answer bytes or the same
/// error code and message, and returns containerd's.
async fn same_answer(
    ctd: &Containerd,
    pg: &Pullgate,
    path: &'static str,
    body: Vec<u8>,
) -> Result<bytes::Bytes, Status> {
    let direct = raw_call(&ctd.socket(), path, body.clone()).await;
    let via = raw_call(&pg.socket(), path, body).await;
    assert_eq!(
        status_parts(&via),
        status_parts(&direct),
        "{path}: error differs\n--- pullgate\n{}",
        pg.log()
    );
    if let (Ok(a), Ok(b)) = (&via, &direct) {
        assert_eq!(a, b, "{path}: answer bytes differ");
    }
    direct
}

/// 13. RuntimeService calls on pullgate's socket get containerd's answers, byte for byte.
#[tokio::test(flavor = "multi_thread")]
async fn runtime_service_rpcs_are_forwarded_unchanged() {
    use k8s_cri::v1 as cri;
    use prost::Message as _;
    let (ctd, pg, _policy) = runtime_pair().await;

    let version = same_answer(
        &ctd,
        &pg,
        "/runtime.v1.RuntimeService/Version",
        cri::VersionRequest {
            version: "v1".into(),
        }
        .encode_to_vec(),
    )
    .await
    .expect("Version");
    let version = cri::VersionResponse::decode(version).expect("VersionResponse");
    assert_eq!(version.runtime_name, "containerd", "{version:?}");

    let list = same_answer(
        &ctd,
        &pg,
        "/runtime.v1.RuntimeService/ListContainers",
        cri::ListContainersRequest::default().encode_to_vec(),
    )
    .await
    .expect("ListContainers");
    assert!(cri::ListContainersResponse::decode(list)
        .expect("ListContainersResponse")
        .containers
        .is_empty());

    same_answer(
        &ctd,
        &pg,
        "/runtime.v1.RuntimeService/ListPodSandbox",
        cri::ListPodSandboxRequest::default().encode_to_vec(),
    )
    .await
    .expect("ListPodSandbox");

    let status = same_answer(
        &ctd,
        &pg,
        "/runtime.v1.RuntimeService/Status",
        cri::StatusRequest { verbose: false }.encode_to_vec(),
    )
    .await
    .expect("Status");
    let status = cri::StatusResponse::decode(status).expect("StatusResponse");
    assert!(
        status
            .status
            .as_ref()
            .is_some_and(|s| s.conditions.iter().any(|c| c.r#type == "RuntimeReady")),
        "{status:?}"
    );

    // Errors come back with containerd's code and message.
    let missing = same_answer(
        &ctd,
        &pg,
        "/runtime.v1.RuntimeService/ContainerStatus",
        cri::ContainerStatusRequest {
            container_id: "no-such-container".into(),
            verbose: false,
        }
        .encode_to_vec(),
    )
    .await;
    assert_eq!(missing.unwrap_err().code(), Code::NotFound);

    let exec = same_answer(
        &ctd,
        &pg,
        "/runtime.v1.RuntimeService/Exec",
        cri::ExecRequest {
            container_id: "no-such-container".into(),
            cmd: vec!["true".into()],
            stdout: true,
            ..Default::default()
        }
        .encode_to_vec(),
    )
    .await;
    assert_eq!(exec.unwrap_err().code(), Code::NotFound);

    // A generated client, as kubelet uses one.
    let channel = connect_uds(&pg.socket()).await.expect("connect pullgate");
    let mut client = cri::runtime_service_client::RuntimeServiceClient::new(channel);
    let typed = client
        .version(cri::VersionRequest {
            version: "v1".into(),
        })
        .await
        .expect("typed Version")
        .into_inner();
    assert_eq!(typed, version);
}

/// 14. Server-streaming calls stay open through pullgate, deliver messages as containerd sends
/// them (request metadata included) and end cleanly when the caller goes away.
#[tokio::test(flavor = "multi_thread")]
async fn streaming_calls_are_forwarded() {
    use containerd_client::services::v1::events_client::EventsClient;
    use containerd_client::services::v1::namespaces_client::NamespacesClient;
    use containerd_client::services::v1::{CreateNamespaceRequest, Namespace, SubscribeRequest};
    use k8s_cri::v1 as cri;
    let (ctd, pg, _policy) = runtime_pair().await;

    // CRI GetContainerEvents: opened the same way on both sockets.
    let events = |sock: std::path::PathBuf| async move {
        let channel = connect_uds(&sock).await.expect("connect");
        cri::runtime_service_client::RuntimeServiceClient::new(channel)
            .get_container_events(cri::GetEventsRequest {})
            .await
            .map(|r| r.into_inner())
    };
    // containerd 1.6 answers at once (an error); 2.x keeps the stream open and sends the
    // response headers only with the first event, so with no containers the call is still
    // waiting for them after a while, directly and through pullgate alike.
    let opened = |sock: std::path::PathBuf| async move {
        tokio::time::timeout(Duration::from_secs(2), events(sock)).await
    };
    let (direct, via) = tokio::join!(opened(ctd.socket()), opened(pg.socket()));
    match (direct, via) {
        (Ok(direct), Ok(via)) => {
            assert_eq!(
                status_parts(&via),
                status_parts(&direct),
                "GetContainerEvents\n--- pullgate\n{}",
                pg.log()
            );
            if let (Ok(mut via), Ok(mut direct)) = (via, direct) {
                // No containers: neither stream has anything to say, and neither has ended.
                let wait = Duration::from_millis(300);
                assert!(tokio::time::timeout(wait, direct.message()).await.is_err());
                assert!(tokio::time::timeout(wait, via.message()).await.is_err());
            }
        }
        (Err(_), Err(_)) => {}
        (direct, via) => panic!(
            "GetContainerEvents: answered within 2 s directly: {}, through pullgate: {}\n--- pullgate\n{}",
            direct.is_ok(),
            via.is_ok(),
            pg.log()
        ),
    }

    // containerd's own event stream, subscribed through pullgate and fed by changes made
    // directly on containerd. containerd sends the response headers with the first event, so
    // the subscription waits in a task while namespaces are created until one is seen.
    let pg_sock = pg.socket();
    let subscriber = tokio::spawn(async move {
        let channel = connect_uds(&pg_sock).await.expect("connect pullgate");
        let mut events = EventsClient::new(channel)
            .subscribe(SubscribeRequest { filters: vec![] })
            .await
            .expect("Subscribe through pullgate")
            .into_inner();
        loop {
            let envelope = events
                .message()
                .await
                .expect("event stream")
                .expect("stream still open");
            if envelope.topic == "/namespaces/create" {
                // Dropping the stream here cancels the call through pullgate.
                return envelope.topic;
            }
        }
    });
    let channel = connect_uds(&ctd.socket())
        .await
        .expect("connect containerd");
    let mut namespaces = NamespacesClient::new(channel);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut n = 0;
    while !subscriber.is_finished() {
        assert!(
            Instant::now() < deadline,
            "no event through pullgate within 10 s\n--- pullgate\n{}",
            pg.log()
        );
        n += 1;
        let name = format!("pullgate-stream-{n}");
        let mut create = tonic::Request::new(CreateNamespaceRequest {
            namespace: Some(Namespace {
                name: name.clone(),
                labels: Default::default(),
            }),
        });
        // containerd publishes the event in the namespace the call names.
        create
            .metadata_mut()
            .insert("containerd-namespace", name.parse().unwrap());
        namespaces.create(create).await.expect("create namespace");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(subscriber.await.expect("subscriber"), "/namespaces/create");

    // A server-streaming call that ends on its own, with request metadata
    // (`containerd-namespace`) reaching containerd.
    let digests_via = {
        use containerd_client::services::v1::content_client::ContentClient;
        use containerd_client::services::v1::ListContentRequest;
        let channel = connect_uds(&pg.socket()).await.expect("connect pullgate");
        let mut req = tonic::Request::new(ListContentRequest { filters: vec![] });
        req.metadata_mut()
            .insert("containerd-namespace", K8S_NAMESPACE.parse().unwrap());
        let mut stream = ContentClient::new(channel)
            .list(req)
            .await
            .expect("content List through pullgate")
            .into_inner();
        let mut digests = Vec::new();
        while let Some(resp) = stream.message().await.expect("content List stream") {
            digests.extend(resp.info.into_iter().map(|i| i.digest));
        }
        digests.sort();
        digests
    };
    assert_eq!(digests_via, ctd.content_digests().await);

    // Cancelled streams left nothing stuck: pullgate still answers.
    same_answer(
        &ctd,
        &pg,
        "/runtime.v1.RuntimeService/ListContainers",
        Vec::new(),
    )
    .await
    .expect("ListContainers after cancelled streams");
}

/// 15. Methods and services pullgate has never heard of reach containerd, whose answer
/// (Unimplemented, with its own message) comes back unchanged.
#[tokio::test(flavor = "multi_thread")]
async fn unknown_runtime_methods_and_services_are_forwarded() {
    let (ctd, pg, _policy) = runtime_pair().await;
    for path in [
        "/runtime.v1.RuntimeService/FutureMethod",
        "/runtime.v2.FutureService/Call",
    ] {
        let answer = same_answer(&ctd, &pg, path, b"\x0a\x01x".to_vec()).await;
        let status = answer.unwrap_err();
        assert_eq!(status.code(), Code::Unimplemented, "{path}: {status:?}");
        assert!(!status.message().is_empty(), "containerd's own message");
    }
}

/// A python3 that can `import grpc` (Debian `python3-grpcio`): `$PULLGATE_TEST_PYTHON`, else
/// `/usr/bin/python3`, else `python3` on PATH.
fn python_with_grpc() -> String {
    let candidates = std::env::var("PULLGATE_TEST_PYTHON")
        .into_iter()
        .chain(["/usr/bin/python3".to_string(), "python3".to_string()]);
    for python in candidates {
        let ok = std::process::Command::new(&python)
            .args(["-c", "import grpc"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return python;
        }
    }
    panic!("no python3 with grpcio: apt-get install python3-grpcio, or set PULLGATE_TEST_PYTHON");
}

/// Runs `tests/grpc_c_core_client.py` against `sock`: one JSON object per call.
async fn c_core_calls(sock: &Path, mode: &str, methods: &[&str]) -> Vec<Value> {
    let mut cmd = std::process::Command::new(python_with_grpc());
    cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/grpc_c_core_client.py"))
        .arg(sock)
        .arg(mode)
        .args(methods);
    let out = tokio::task::spawn_blocking(move || run_with_timeout(cmd, Duration::from_secs(60)))
        .await
        .expect("python client task");
    assert!(out.success(), "python client failed: {}", out.stderr);
    out.stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect()
}

/// 16. A gRPC C-core client (Python grpcio) is served as containerd serves it, whatever
/// `:authority` it sends: its percent-encoded socket path (newer grpcio's default, which the
/// h2 crate refuses with RST_STREAM), grpcio's default, and grpc-go's `localhost`. Two calls per
/// method on one connection, so the client's HPACK table is reused.
#[tokio::test(flavor = "multi_thread")]
async fn grpc_c_core_clients_are_accepted_with_any_authority() {
    let (ctd, pg, _policy) = runtime_pair().await;
    let methods = [
        "/runtime.v1.RuntimeService/Version",
        "/runtime.v1.ImageService/ImageFsInfo",
        "/runtime.v1.RuntimeService/FutureMethod",
    ];
    for mode in ["c-core", "default", "localhost"] {
        let direct = c_core_calls(&ctd.socket(), mode, &methods).await;
        let via = c_core_calls(&pg.socket(), mode, &methods).await;
        assert_eq!(direct.len(), 2 * methods.len(), "{direct:?}");
        assert_eq!(via.len(), direct.len(), "{via:?}");
        for (d, v) in direct.iter().zip(&via) {
            let what = format!("{mode} {}", d["method"]);
            assert_eq!(
                v["code"],
                d["code"],
                "{what}: {v} vs containerd {d}\n--- pullgate\n{}",
                pg.log()
            );
            if d["method"] == "/runtime.v1.ImageService/ImageFsInfo" {
                // Usage figures and timestamps change between calls.
                assert_eq!(d["code"], "OK", "{what}: {d}");
            } else {
                assert_eq!(v["details"], d["details"], "{what}");
                assert_eq!(v["response_hex"], d["response_hex"], "{what}");
            }
        }
        assert_eq!(direct[0]["code"], "OK", "{mode}: {direct:?}");
        assert_eq!(direct[4]["code"], "UNIMPLEMENTED", "{mode}: {direct:?}");
    }
}
