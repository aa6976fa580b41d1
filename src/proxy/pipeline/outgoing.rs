//! The request as it goes upstream: its head rewritten by the header rules of
//! SPEC §3, its body wrapped (streamed once and capped, or kept for replay),
//! and — only for a request that may be sent again after reaching a node — a
//! copy of its head, so an attempt that consumed the original can be followed
//! by another.

use super::super::RuntimeConfig;
use super::super::error::ProxyError;
use super::super::head::Head;
use super::super::headers::{self, ClientInfo};
use super::consistency;
use crate::clock::Hlc;
use crate::resilience::is_idempotent;
use crate::telemetry::TraceContext;
use crate::upstream::{Replayer, RequestBody, Upload};
use http::{HeaderValue, Method, Request};
use http_body::Body;
use hyper::body::Incoming;

/// The request on its way upstream.
pub(crate) struct Outgoing {
    /// The request to send next. An attempt takes it once a connection is
    /// ready, and puts it back when none of it was written; empty after an
    /// attempt that wrote any of it.
    ready: Option<Request<RequestBody>>,
    /// The head again, for a request that may be sent twice.
    head: Option<Head>,
    /// The body again, likewise.
    replayer: Option<Replayer>,
    /// The body as the response sees it (none for an empty body).
    upload: Option<Upload>,
}

impl Outgoing {
    /// The client's request made ready for `epoch`'s nodes: checked `host`,
    /// forwarding headers for `client`, a hop of `trace`, and a write's HLC
    /// `stamp` (replacing any the client sent).
    pub(crate) fn prepare(
        req: Request<Incoming>,
        host: Option<HeaderValue>,
        client: &ClientInfo,
        epoch: &HeaderValue,
        trace: (TraceContext, bool),
        stamp: Option<Hlc>,
        settings: &RuntimeConfig,
    ) -> Result<Outgoing, ProxyError> {
        let (mut parts, body) = req.into_parts();
        let body = request_body(&parts.method, body, settings)?;
        headers::to_upstream(&mut parts, host, client, epoch, trace);
        if let Some(stamp) = stamp
            && let Ok(v) = HeaderValue::from_bytes(&stamp.to_hex())
        {
            parts.headers.insert(consistency::HLC, v);
        }
        // Only requests that may be sent again after reaching an upstream keep
        // a copy of their head; everything else gets its request back unsent.
        let head = (is_idempotent(&parts.method) && settings.retry.max_attempts > 1)
            .then(|| Head::of(&parts));
        let replayer = head.as_ref().and_then(|_| body.replayer());
        let upload = body.upload();
        Ok(Outgoing {
            ready: Some(Request::from_parts(parts, body)),
            head,
            replayer,
            upload,
        })
    }

    /// Make sure a request is ready to send, rebuilding it from the kept
    /// copy if an attempt used it up; `false` if it cannot be.
    pub(crate) fn refill(&mut self) -> bool {
        if self.ready.is_none() {
            self.ready = self.again();
        }
        self.ready.is_some()
    }

    /// The request again, rebuilt from the kept head and body, if it may be.
    fn again(&self) -> Option<Request<RequestBody>> {
        self.head
            .as_ref()?
            .with_body(self.replayer.as_ref()?.next()?)
    }

    /// Where an attempt takes the request from and puts it back.
    pub(crate) fn slot(&mut self) -> &mut Option<Request<RequestBody>> {
        &mut self.ready
    }

    /// Whether the request can still be sent again: it is back unsent, or a
    /// copy can be rebuilt (nothing read of its body was discarded).
    pub(crate) fn can_resend(&self) -> bool {
        self.ready.is_some() || self.replayer.as_ref().is_some_and(Replayer::can_replay)
    }

    /// The request was placed again under a newer map: send its epoch from now on.
    pub(crate) fn set_epoch(&mut self, epoch: &HeaderValue) {
        if let Some(req) = self.ready.as_mut() {
            req.headers_mut()
                .insert(headers::EPOCH_HEADER, epoch.clone());
        }
        if let Some(head) = self.head.as_mut() {
            head.set_epoch(epoch);
        }
    }

    /// The request's body if the client is still sending it: an answer that
    /// arrives before it ends closes the client's connection after it.
    pub(crate) fn unfinished_upload(&mut self) -> Option<Upload> {
        self.upload.take_if(|u| u.unfinished())
    }

    /// What `debug` logging says about a request that could not be sent again.
    pub(crate) fn why_not_again(&self) -> (bool, bool) {
        (self.head.is_some(), self.replayer.is_some())
    }
}

/// How the body travels: empty, streamed once, or kept for replay.
fn request_body(
    method: &Method,
    body: Incoming,
    settings: &RuntimeConfig,
) -> Result<RequestBody, ProxyError> {
    let max = settings.limits.max_body_bytes;
    if body.size_hint().lower() > max {
        return Err(ProxyError::PayloadTooLarge { limit: max });
    }
    if body.is_end_stream() {
        return Ok(RequestBody::empty());
    }
    let retry = &settings.retry;
    if is_idempotent(method) && retry.max_attempts > 1 && retry.buffer_limit > 0 {
        Ok(RequestBody::replayable(body, retry.buffer_limit, max))
    } else {
        Ok(RequestBody::streaming(body, max))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outgoing(method: &str, kept: bool) -> Outgoing {
        let req = Request::builder()
            .method(method)
            .uri("/kv/a")
            .header("host", "shard")
            .header(headers::EPOCH_HEADER, "7")
            .body(RequestBody::empty())
            .unwrap();
        let (parts, body) = req.into_parts();
        Outgoing {
            head: kept.then(|| Head::of(&parts)),
            replayer: if kept { body.replayer() } else { None },
            upload: body.upload(),
            ready: Some(Request::from_parts(parts, body)),
        }
    }

    #[test]
    fn a_request_used_up_by_an_attempt_is_rebuilt_from_its_copy() {
        let mut o = outgoing("GET", true);
        let sent = o.slot().take().unwrap();
        assert!(o.can_resend());
        assert!(o.refill());
        let again = o.slot().take().unwrap();
        assert_eq!(again.method(), sent.method());
        assert_eq!(again.uri(), sent.uri());
        assert_eq!(again.headers(), sent.headers());
    }

    #[test]
    fn a_request_without_a_copy_goes_again_only_if_it_came_back_unsent() {
        let mut o = outgoing("POST", false);
        assert!(o.can_resend(), "still in hand: nothing of it was sent");
        let _sent = o.slot().take();
        assert!(!o.can_resend());
        assert!(!o.refill(), "a POST that may have arrived is never rebuilt");
        assert_eq!(o.why_not_again(), (false, false));
    }

    #[test]
    fn a_request_placed_again_carries_the_newer_epoch_in_hand_and_in_its_copy() {
        let mut o = outgoing("GET", true);
        o.set_epoch(&HeaderValue::from(9));
        let in_hand = o.slot().take().unwrap();
        assert_eq!(in_hand.headers()[headers::EPOCH_HEADER], "9");
        assert!(o.refill());
        let rebuilt = o.slot().take().unwrap();
        assert_eq!(rebuilt.headers()[headers::EPOCH_HEADER], "9");
    }
}
