//! Rego policies (attestation `policy` and CIP-level `spec.policy`), evaluated with regorus the
//! way policy-controller evaluates them, so existing policies keep their meaning:
//! - the document under test is `input` (the in-toto statement of an attestation, or the
//!   policy result document for a CIP-level policy);
//! - policies are Rego v0 (policy-controller pins OPA to v0 syntax);
//! - the decision is `data.sigstore.isCompliant`: `true`, or a set of objects
//!   `{"result": bool, "error": "…", "warning": "…"}` of which one must have `result: true`
//!   (a single such object is read the same way). Undefined or `false` is not compliant.
//! - a compliant result that carries a warning is not accepted, as upstream treats it.
//!
//! Cost is bounded by a wall-clock execution limit per evaluation and by the size limits on
//! policies and on the attestations fed in. regorus can also cap memory, but only with its
//! own global allocator (`allocator-memory-limits`), which pullgate does not install.

use std::num::NonZeroU32;
use std::time::Duration;

use serde_json::Value;

/// The query policy-controller evaluates, as it names it in messages.
pub const QUERY: &str = "isCompliant = data.sigstore.isCompliant";
const RULE: &str = "data.sigstore.isCompliant";
/// Largest policy accepted.
const MAX_POLICY_BYTES: usize = 1 << 20;
/// Wall-clock budget of one evaluation: a policy that loops denies instead of stalling a pull.
const EVAL_LIMIT: Duration = Duration::from_secs(2);

/// A parsed policy. Each evaluation runs on a clone of the parsed engine, so policies are
/// parsed once (at snapshot build) and evaluations share no state.
#[derive(Clone)]
pub struct RegoPolicy {
    source: String,
    engine: regorus::Engine,
}

impl std::fmt::Debug for RegoPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegoPolicy")
            .field("bytes", &self.source.len())
            .finish()
    }
}

/// The first lines of a regorus error: enough to locate a parse error without a page of text.
fn short(e: &dyn std::fmt::Display) -> String {
    e.to_string().lines().take(3).collect::<Vec<_>>().join(" ")
}

fn not_compliant() -> String {
    format!("policy is not compliant for query '{QUERY}'")
}

/// Reads `data.sigstore.isCompliant` (as JSON) the way policy-controller does.
fn judge(result: &Value) -> Result<(), String> {
    let items: Vec<&Value> = match result {
        Value::Bool(true) => return Ok(()),
        Value::Array(items) => items.iter().collect(),
        Value::Object(_) => vec![result],
        _ => return Err(not_compliant()),
    };
    let mut failure = not_compliant();
    for item in items {
        let Value::Object(o) = item else {
            return Err(format!("{}: unexpected result {item}", not_compliant()));
        };
        let text = |k: &str| o.get(k).and_then(Value::as_str).unwrap_or_default();
        if o.get("result") == Some(&Value::Bool(true)) {
            return match text("warning") {
                "" => Ok(()),
                w => Err(format!("warning: {w}")),
            };
        }
        failure = format!("{} with errors: {}", not_compliant(), text("error"));
    }
    Err(failure)
}

impl RegoPolicy {
    /// Parses `source`; a policy that does not parse makes its authority (or CIP) unusable.
    pub fn compile(source: &str) -> Result<RegoPolicy, String> {
        if source.len() > MAX_POLICY_BYTES {
            return Err(format!("rego policy larger than {MAX_POLICY_BYTES} bytes"));
        }
        let mut engine = regorus::Engine::new();
        engine.set_rego_v0(true);
        engine.set_execution_timer_config(regorus::utils::limits::ExecutionTimerConfig {
            limit: EVAL_LIMIT,
            check_interval: NonZeroU32::new(64).unwrap_or(NonZeroU32::MIN),
        });
        engine
            .add_policy("policy.rego".to_string(), source.to_string())
            .map_err(|e| format!("rego does not parse: {}", short(&e)))?;
        Ok(RegoPolicy {
            source: source.to_string(),
            engine,
        })
    }

    /// The policy text (hashed into the snapshot fingerprint).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// `Ok` when the policy finds `input` compliant; else the reason users see (the policy's
    /// own `error` text when it gives one).
    ///
    /// An evaluation may take its whole budget (2 s) of CPU. On a multi-threaded tokio runtime
    /// it runs with [`tokio::task::block_in_place`], so the worker it started on hands its other
    /// tasks to another thread first: pass-through RPCs (`ImageStatus`, `ListImages`) and other
    /// decisions never wait behind a slow policy.
    pub fn evaluate(&self, input: &Value) -> Result<(), String> {
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if multi_thread {
            tokio::task::block_in_place(|| self.evaluate_here(input))
        } else {
            self.evaluate_here(input)
        }
    }

    fn evaluate_here(&self, input: &Value) -> Result<(), String> {
        let mut engine = self.engine.clone();
        let input = regorus::Value::from_json_str(&input.to_string())
            .map_err(|e| format!("policy input: {}", short(&e)))?;
        engine.set_input(input);
        let result = engine
            .eval_rule(RULE.to_string())
            .map_err(|e| format!("{}: evaluation failed: {}", not_compliant(), short(&e)))?;
        let json = result
            .to_json_str()
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or(Value::Null);
        judge(&json)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const POLICY: &str = r#"package sigstore
default isCompliant = false
isCompliant {
  input.predicate.builder.id == "https://ci.example/builder"
}
"#;

    #[test]
    fn compliant_not_compliant_and_broken() {
        let p = RegoPolicy::compile(POLICY).unwrap();
        let good = json!({"predicate": {"builder": {"id": "https://ci.example/builder"}}});
        assert!(p.evaluate(&good).is_ok());
        let err = p
            .evaluate(&json!({"predicate": {"builder": {"id": "evil"}}}))
            .unwrap_err();
        assert_eq!(
            err,
            "policy is not compliant for query 'isCompliant = data.sigstore.isCompliant'"
        );
        let err = RegoPolicy::compile("package sigstore\nisCompliant {").unwrap_err();
        assert!(err.starts_with("rego does not parse"), "{err}");
    }

    #[test]
    fn set_of_results_with_error_and_warning() {
        let p = RegoPolicy::compile(
            r#"package sigstore
isCompliant[response] {
  ok := input.critical == 0
  response := {"result": ok, "error": sprintf("%d critical vulnerabilities", [input.critical]), "warning": ""}
}
"#,
        )
        .unwrap();
        assert!(p.evaluate(&json!({"critical": 0})).is_ok());
        let err = p.evaluate(&json!({"critical": 3})).unwrap_err();
        assert_eq!(
            err,
            "policy is not compliant for query 'isCompliant = data.sigstore.isCompliant' with errors: 3 critical vulnerabilities"
        );
        assert_eq!(
            judge(&json!([{"result": true, "warning": "old scan"}])).unwrap_err(),
            "warning: old scan"
        );
        assert!(judge(&json!({"result": true})).is_ok());
        assert!(judge(&json!(null)).is_err());
        assert!(judge(&json!("true")).is_err());
    }

    #[test]
    fn runaway_policy_is_stopped() {
        // A cross product large enough to run far past the limit.
        let p = RegoPolicy::compile(
            r#"package sigstore
isCompliant {
  count([x | numbers.range(1, 100000)[a]; numbers.range(1, 100000)[b]; x := a * b]) > 0
}
"#,
        )
        .unwrap();
        let started = std::time::Instant::now();
        assert!(p.evaluate(&json!({})).is_err());
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
