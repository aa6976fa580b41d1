//! The kept copy of a request head, for sending a request again after an
//! attempt consumed the original.

use super::headers::EPOCH_HEADER;
use crate::upstream::RequestBody;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Uri, Version, request};

/// Bytes that say how long the field after them is.
const LEN: usize = size_of::<usize>();

/// A request head (as sent upstream) copied into one buffer of its own.
///
/// Not a clone of the request's `Uri` and `HeaderMap`: the client's target and
/// header values are slices of hyper's read buffer, and a clone sharing them
/// keeps that buffer in use, so hyper allocates a fresh 8 KiB one for the
/// connection's next read — on every request. The copy is one allocation with
/// no reference counts; it is parsed back only when the request is sent again.
pub(super) struct Head {
    method: Method,
    /// The target, then each header's name and value, in the map's order;
    /// each field is its length (native-endian `usize`) followed by its bytes.
    fields: Box<[u8]>,
    /// The map epoch to send instead of the copied one, once the request has
    /// been placed again under a newer map.
    epoch: Option<HeaderValue>,
}

impl Head {
    /// Copy the head of `parts`, whose target is already in origin form.
    pub(super) fn of(parts: &request::Parts) -> Head {
        let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        let size = parts
            .headers
            .iter()
            .fold(LEN + target.len(), |n, (name, value)| {
                n + 2 * LEN + name.as_str().len() + value.len()
            });
        let mut fields = Vec::with_capacity(size);
        push(&mut fields, target.as_bytes());
        for (name, value) in &parts.headers {
            push(&mut fields, name.as_str().as_bytes());
            push(&mut fields, value.as_bytes());
        }
        Head {
            method: parts.method.clone(),
            fields: fields.into_boxed_slice(),
            epoch: None,
        }
    }

    /// Send `epoch` as the map epoch from now on: the request was placed
    /// again under a newer map.
    pub(super) fn set_epoch(&mut self, epoch: &HeaderValue) {
        self.epoch = Some(epoch.clone());
    }

    /// The request again, with `body`; `None` if the copy does not parse back
    /// (it always does: every field was a valid target, name or value).
    pub(super) fn with_body(&self, body: RequestBody) -> Option<Request<RequestBody>> {
        let mut fields = Fields(&self.fields);
        let uri = Uri::try_from(fields.next()?).ok()?;
        let mut headers = HeaderMap::new();
        while let Some(name) = fields.next() {
            let value = fields.next()?;
            headers.append(
                HeaderName::from_bytes(name).ok()?,
                HeaderValue::from_bytes(value).ok()?,
            );
        }
        if let Some(epoch) = &self.epoch {
            headers.insert(EPOCH_HEADER, epoch.clone());
        }
        let mut req = Request::new(body);
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = uri;
        *req.version_mut() = Version::HTTP_11;
        *req.headers_mut() = headers;
        Some(req)
    }
}

fn push(fields: &mut Vec<u8>, field: &[u8]) {
    fields.extend_from_slice(&field.len().to_ne_bytes());
    fields.extend_from_slice(field);
}

/// The fields `push` wrote, in order.
struct Fields<'a>(&'a [u8]);

impl<'a> Iterator for Fields<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let (len, rest) = self.0.split_first_chunk::<LEN>()?;
        let (field, rest) = rest.split_at_checked(usize::from_ne_bytes(*len))?;
        self.0 = rest;
        Some(field)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn parts(target: &str, headers: &[(&str, &str)]) -> request::Parts {
        let mut b = Request::builder().method("GET").uri(target);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn rebuilt(head: &Head) -> Request<RequestBody> {
        head.with_body(RequestBody::empty())
            .expect("the copy parses back")
    }

    #[test]
    fn a_kept_head_rebuilds_the_same_request() {
        let p = parts(
            "/kv/user%3A42?x=1&y=",
            &[
                ("host", "shop.example:8080"),
                ("x-shard-key", "user:42"),
                ("accept", "a"),
                ("x-forwarded-for", "1.1.1.1, 2.2.2.2"),
                ("accept", "b"),
                ("x-empty", ""),
                ("x-bytes", "caf\u{e9} \t:;"),
                ("x-cluster-epoch", "7"),
            ],
        );
        let req = rebuilt(&Head::of(&p));
        assert_eq!(req.method(), Method::GET);
        assert_eq!(req.uri(), "/kv/user%3A42?x=1&y=");
        assert_eq!(req.version(), Version::HTTP_11);
        let order = |h: &HeaderMap| {
            h.iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(order(req.headers()), order(&p.headers));
    }

    #[test]
    fn a_newer_epoch_replaces_the_copied_one() {
        let p = parts("/x", &[("x-cluster-epoch", "7"), ("x-keep", "1")]);
        let mut head = Head::of(&p);
        head.set_epoch(&HeaderValue::from_static("8"));
        let req = rebuilt(&head);
        let epochs: Vec<_> = req.headers().get_all(EPOCH_HEADER).iter().collect();
        assert_eq!(epochs, ["8"]);
        assert_eq!(req.headers()["x-keep"], "1");
    }

    #[test]
    fn a_kept_head_holds_nothing_of_the_clients_buffer() {
        // What hyper parses a request into: slices of one shared read buffer.
        let buffer = Bytes::from(b"/kv/1shop.example".to_vec());
        let mut p = parts("/", &[]);
        p.uri = Uri::from_maybe_shared(buffer.slice(0..5)).unwrap();
        p.headers.insert(
            http::header::HOST,
            HeaderValue::from_maybe_shared(buffer.slice(5..)).unwrap(),
        );
        let head = Head::of(&p);
        drop(p);
        assert!(buffer.is_unique(), "the kept head shares the read buffer");
        assert_eq!(rebuilt(&head).headers()["host"], "shop.example");
    }

    #[test]
    fn a_damaged_copy_gives_no_request_rather_than_a_wrong_one() {
        let p = parts("/x", &[("x-a", "1")]);
        let mut head = Head::of(&p);
        let mut fields = head.fields.to_vec();
        fields.pop();
        head.fields = fields.into_boxed_slice();
        assert!(head.with_body(RequestBody::empty()).is_none());
    }
}
