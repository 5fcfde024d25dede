//! `AdmissionReview` `admission.k8s.io/v1`: the request fields the webhooks read, and the
//! response. Anything that is not a well-formed review is a [`BadReview`] (HTTP 400), never a
//! crash and never an answer the API server could mistake for a decision.

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// The only AdmissionReview version served.
pub const API_VERSION: &str = "admission.k8s.io/v1";
pub const KIND: &str = "AdmissionReview";
/// Longest `request.uid` accepted: the API server sends a UUID; the uid is echoed and logged.
pub const MAX_UID_BYTES: usize = 256;

/// Why a request body is not an AdmissionReview the shim can answer. Each message is one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadReview {
    #[error("request body is larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("request body could not be read: {0}")]
    Unreadable(String),
    #[error("request body is not JSON: {0}")]
    NotJson(String),
    #[error("not an AdmissionReview {API_VERSION}: got apiVersion {api_version:?}, kind {kind:?}")]
    NotReview { api_version: String, kind: String },
    #[error("AdmissionReview has no request")]
    NoRequest,
    #[error("AdmissionReview request has no uid")]
    NoUid,
    #[error("AdmissionReview request is malformed: {0}")]
    Malformed(String),
}

/// `request.kind`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct GroupVersionKind {
    pub group: String,
    pub version: String,
    pub kind: String,
}

/// The parts of `request` the webhooks use; everything else is skipped without being copied.
/// `object` stays the raw JSON text of the request body: each webhook reads from it exactly
/// the typed fields it needs, so a review is never held as a `serde_json::Value` tree.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Request<'a> {
    pub uid: String,
    pub kind: GroupVersionKind,
    pub sub_resource: Option<String>,
    pub name: Option<String>,
    pub namespace: Option<String>,
    /// CREATE, UPDATE, DELETE or CONNECT.
    pub operation: String,
    #[serde(borrow)]
    pub object: Option<&'a RawValue>,
    pub dry_run: Option<bool>,
}

impl<'a> Request<'a> {
    /// The object under review; a CREATE or UPDATE without one is denied, never guessed at.
    pub fn object_or_deny(&self) -> Result<&'a RawValue, Response> {
        self.object.ok_or_else(|| {
            Response::deny(
                &self.uid,
                format!(
                    "validation failed: the {} request carries no object",
                    self.operation
                ),
            )
        })
    }
}

/// The review envelope; `request` is read in a second, typed step so its errors carry a path.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope<'a> {
    #[serde(default)]
    api_version: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default, borrow)]
    request: Option<&'a RawValue>,
}

/// Parses a request body, borrowing the object from it. Size limits are the HTTP layer's job.
pub fn parse(body: &[u8]) -> Result<Request<'_>, BadReview> {
    let envelope: Envelope = match serde_json::from_slice(body) {
        Ok(e) => e,
        Err(e) if e.is_syntax() || e.is_eof() || e.is_io() => {
            return Err(BadReview::NotJson(one_line(&e)))
        }
        // Valid JSON of another shape (a list, a number where a string belongs).
        Err(_) => {
            return Err(BadReview::NotReview {
                api_version: String::new(),
                kind: String::new(),
            })
        }
    };
    let api_version = envelope.api_version.unwrap_or_default();
    let kind = envelope.kind.unwrap_or_default();
    if api_version != API_VERSION || kind != KIND {
        return Err(BadReview::NotReview { api_version, kind });
    }
    let Some(raw) = envelope.request else {
        return Err(BadReview::NoRequest);
    };
    let request: Request =
        typed(raw).map_err(|(path, e)| BadReview::Malformed(format!("request.{path}: {e}")))?;
    if request.uid.is_empty() {
        return Err(BadReview::NoUid);
    }
    if request.uid.len() > MAX_UID_BYTES {
        return Err(BadReview::Malformed(format!(
            "request.uid: longer than {MAX_UID_BYTES} bytes"
        )));
    }
    Ok(request)
}

/// Deserializes `raw` into `T`, borrowing from it where `T` does. `Err`: the path of the field
/// that failed (`.` for the root) and the reason, without serde_json's position suffix.
pub fn typed<'a, T: Deserialize<'a>>(raw: &'a RawValue) -> Result<T, (String, String)> {
    let mut de = serde_json::Deserializer::from_str(raw.get());
    serde_path_to_error::deserialize(&mut de)
        .map_err(|e| (e.path().to_string(), without_position(e.inner())))
}

/// serde_json's message without its ` at line L column C` suffix (positions inside a
/// sub-document mean nothing to the caller; the field path says where).
pub fn without_position(e: &serde_json::Error) -> String {
    let text = one_line(e);
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    text.strip_suffix(&suffix).unwrap_or(&text).to_string()
}

fn one_line(e: &impl std::fmt::Display) -> String {
    e.to_string().replace(['\n', '\r'], " ")
}

/// An answer to one review.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub uid: String,
    pub allowed: bool,
    /// Why it was denied (`status.message`).
    pub message: Option<String>,
    pub warnings: Vec<String>,
    /// A JSONPatch (serialized JSON) to apply.
    pub patch: Option<Vec<u8>>,
}

impl Response {
    pub fn allow(uid: &str) -> Response {
        Response {
            uid: uid.to_string(),
            allowed: true,
            message: None,
            warnings: Vec::new(),
            patch: None,
        }
    }

    pub fn deny(uid: &str, message: String) -> Response {
        Response {
            uid: uid.to_string(),
            allowed: false,
            message: Some(message),
            warnings: Vec::new(),
            patch: None,
        }
    }

    /// The AdmissionReview body sent back.
    pub fn to_json(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct Status<'a> {
            status: &'a str,
            message: &'a str,
            reason: &'a str,
            code: u16,
        }
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Inner<'a> {
            uid: &'a str,
            allowed: bool,
            #[serde(skip_serializing_if = "Option::is_none")]
            status: Option<Status<'a>>,
            #[serde(skip_serializing_if = "<[String]>::is_empty")]
            warnings: &'a [String],
            #[serde(skip_serializing_if = "Option::is_none")]
            patch_type: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            patch: Option<String>,
        }
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Review<'a> {
            api_version: &'a str,
            kind: &'a str,
            response: Inner<'a>,
        }
        let status = match (&self.message, self.allowed) {
            (Some(message), false) => Some(Status {
                status: "Failure",
                message,
                reason: "Forbidden",
                code: 403,
            }),
            _ => None,
        };
        let review = Review {
            api_version: API_VERSION,
            kind: KIND,
            response: Inner {
                uid: &self.uid,
                allowed: self.allowed,
                status,
                warnings: &self.warnings,
                patch_type: self.patch.as_ref().map(|_| "JSONPatch"),
                patch: self
                    .patch
                    .as_ref()
                    .map(|p| base64::engine::general_purpose::STANDARD.encode(p)),
            },
        };
        // Plain strings, bools and numbers: serializing cannot fail.
        serde_json::to_vec(&review).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn bad_reviews_have_one_line_reasons() {
        let cases: [(&[u8], &str); 6] = [
            (b"{nope", "request body is not JSON: "),
            (
                br#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview"}"#,
                "not an AdmissionReview admission.k8s.io/v1: got apiVersion \"admission.k8s.io/v1beta1\"",
            ),
            (
                br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#,
                "AdmissionReview has no request",
            ),
            (
                br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"operation":"CREATE"}}"#,
                "AdmissionReview request has no uid",
            ),
            (
                br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"u","namespace":7}}"#,
                "AdmissionReview request is malformed: request.namespace: invalid type",
            ),
            (b"[1,2]", "not an AdmissionReview"),
        ];
        for (body, want) in cases {
            let got = parse(body).unwrap_err().to_string();
            assert!(
                got.starts_with(want),
                "{got:?} does not start with {want:?}"
            );
            assert!(!got.contains('\n'), "{got:?}");
        }
    }

    #[test]
    fn response_shape() {
        let mut r = Response::deny("u-1", "validation failed: x".into());
        r.warnings.push("w".into());
        let v: Value = serde_json::from_slice(&r.to_json()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                "response": {"uid": "u-1", "allowed": false, "warnings": ["w"],
                    "status": {"status": "Failure", "message": "validation failed: x",
                               "reason": "Forbidden", "code": 403}}})
        );
        let mut r = Response::allow("u-2");
        r.patch = Some(b"[]".to_vec());
        let v: Value = serde_json::from_slice(&r.to_json()).unwrap();
        assert_eq!(v["response"]["patchType"], "JSONPatch");
        assert_eq!(v["response"]["patch"], "W10=");
    }
}
