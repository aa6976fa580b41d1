//! The one shape every error shardgate answers over HTTP takes (SPEC §3):
//! `{"error": code, "message": sentence, "partition": index or null}`, with
//! `content-type: application/json`, `x-shardgate-error: code`, and
//! `Retry-After` on a 503. The proxy, its admin listener, the coordinator and
//! connections refused before any HTTP parsing all render through here.

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderName, HeaderValue, Response, StatusCode};
use serde::Serialize;

/// `x-shardgate-error`: the error code, for clients that do not parse bodies.
pub const ERROR_HEADER: HeaderName = HeaderName::from_static("x-shardgate-error");

/// One error answer.
#[derive(Debug, Serialize)]
pub struct JsonError<'a> {
    /// Not in the body: the HTTP status.
    #[serde(skip)]
    pub status: StatusCode,
    /// The machine-readable code (`missing_shard_key`, `conflict`...).
    #[serde(rename = "error")]
    pub code: &'a str,
    /// A sentence for a human.
    pub message: String,
    /// The partition the error concerns, when one was chosen.
    pub partition: Option<u32>,
    /// Every individual problem, when there are several (an invalid map).
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub errors: Vec<String>,
}

impl<'a> JsonError<'a> {
    /// An error with no partition and no list of problems.
    pub fn new(status: StatusCode, code: &'a str, message: impl Into<String>) -> JsonError<'a> {
        JsonError {
            status,
            code,
            message: message.into(),
            partition: None,
            errors: Vec::new(),
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Bytes {
        // Serialising plain strings and numbers cannot fail.
        Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }

    /// The response, with the headers every error carries.
    pub fn response<B: From<Bytes>>(&self) -> Response<B> {
        let body = self.body();
        let len = body.len();
        let mut resp = Response::new(B::from(body));
        *resp.status_mut() = self.status;
        let h = resp.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        h.insert(CONTENT_LENGTH, HeaderValue::from(len));
        if let Ok(code) = HeaderValue::from_str(self.code) {
            h.insert(ERROR_HEADER, code);
        }
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            h.insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }

    /// A whole HTTP/1.1 response that closes the connection, for a client
    /// answered before anything it sent was parsed.
    pub fn raw_http1(&self) -> Vec<u8> {
        let body = self.body();
        let retry = if self.status == StatusCode::SERVICE_UNAVAILABLE {
            "retry-after: 1\r\n"
        } else {
            ""
        };
        let mut out = format!(
            "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\nx-shardgate-error: {}\r\n\
             {retry}connection: close\r\ncontent-length: {}\r\n\r\n",
            self.status.as_u16(),
            self.status.canonical_reason().unwrap_or(""),
            self.code,
            body.len()
        )
        .into_bytes();
        out.extend_from_slice(&body);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_has_the_spec_shape_and_headers() {
        let mut e = JsonError::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", "too busy");
        e.partition = Some(2);
        let resp: Response<Bytes> = e.response();
        assert_eq!(resp.status(), 503);
        assert_eq!(resp.headers()["x-shardgate-error"], "overloaded");
        assert_eq!(resp.headers()["retry-after"], "1");
        assert_eq!(resp.headers()["content-type"], "application/json");
        let v: serde_json::Value = serde_json::from_slice(resp.body()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"error": "overloaded", "message": "too busy", "partition": 2})
        );
    }

    #[test]
    fn a_list_of_problems_appears_only_when_there_is_one() {
        let mut e = JsonError::new(StatusCode::BAD_REQUEST, "invalid_topology", "bad map");
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert!(v.get("errors").is_none());
        assert_eq!(v["partition"], serde_json::Value::Null);
        e.errors = vec!["a".into(), "b".into()];
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["errors"], serde_json::json!(["a", "b"]));
    }

    #[test]
    fn the_raw_form_is_a_complete_closing_http1_response() {
        let e = JsonError::new(StatusCode::BAD_REQUEST, "bad_request", "use https");
        let raw = String::from_utf8(e.raw_http1()).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{head}");
        assert!(head.contains("connection: close"));
        assert!(!head.contains("retry-after"));
        assert!(head.contains(&format!("content-length: {}", body.len())));
        assert!(body.contains("\"use https\""));
    }
}
