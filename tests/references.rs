//! Which policies apply to a reference is decided on the reference as it will be fetched:
//! the table of tests/fixtures/references.yaml through `pullgate verify` (the admission shim
//! runs the same table in tests/admission.rs).

mod common;
use common::references::reference_cases;
use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn reference_table_through_pullgate_verify() {
    let reg = Registry::start().await;
    for case in reference_cases(&reg).await {
        let v = verify_json(
            &[("policies.yaml", &case.policies)],
            &case.image,
            &["--namespace", "demo"],
        )
        .await;
        let what = format!("{}: {} -> {} {}", case.name, case.image, v.json, v.stderr);
        match case.verdict.as_str() {
            "allow" => assert_eq!((v.code, v.verdict()), (0, "allow"), "{what}"),
            "deny" => assert_eq!((v.code, v.verdict()), (1, "deny"), "{what}"),
            // Bad input: refused before any policy is asked, with the reason on stderr.
            "error" => assert_eq!(v.code, 2, "{what}"),
            other => panic!("unknown verdict {other} in {what}"),
        }
        if let Some(reason) = &case.reason {
            let said = format!("{} {}", v.reasons(), v.stderr);
            assert!(said.contains(reason.as_str()), "{what}: wanted {reason:?}");
        }
    }
}
