//! `AdmissionReview` `admission.k8s.io/v1`: the request fields the webhooks read, and the
//! response. Anything that is not a well-formed review is a [`BadReview`] (HTTP 400), never a
//! crash and never an answer the API server could mistake for a decision.

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The only AdmissionReview version served.
pub const API_VERSION: &str = "admission.k8s.io/v1";
pub const KIND: &str = "AdmissionReview";

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

/// The parts of `request` the webhooks use; everything else is ignored.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Request {
    pub uid: String,
    pub kind: GroupVersionKind,
    pub sub_resource: Option<String>,
    pub name: Option<String>,
    pub namespace: Option<String>,
    /// CREATE, UPDATE, DELETE or CONNECT.
    pub operation: String,
    pub object: Option<Value>,
    pub dry_run: Option<bool>,
}

impl Request {
    /// The object under review; a CREATE or UPDATE without one is denied, never guessed at.
    pub fn object_or_deny(&self) -> Result<&Value, Response> {
        self.object.as_ref().ok_or_else(|| {
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

/// Parses a request body. Size limits are the HTTP layer's job.
pub fn parse(body: &[u8]) -> Result<Request, BadReview> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| BadReview::NotJson(one_line(&e)))?;
    let field = |name: &str| {
        value
            .get(name)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let (api_version, kind) = (field("apiVersion"), field("kind"));
    if api_version != API_VERSION || kind != KIND {
        return Err(BadReview::NotReview { api_version, kind });
    }
    let request = match value.get("request") {
        None | Some(Value::Null) => return Err(BadReview::NoRequest),
        Some(r) => r,
    };
    let request: Request = serde_path_to_error::deserialize(request).map_err(|e| {
        BadReview::Malformed(format!("request.{}: {}", e.path(), one_line(e.inner())))
    })?;
    if request.uid.is_empty() {
        return Err(BadReview::NoUid);
    }
    Ok(request)
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
