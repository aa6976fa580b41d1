//! Respond, a layer: where the proxy's own answers become responses. Every
//! error raised below — a shed request, a missing key, an upstream that
//! failed — arrives here as a [`Failed`] and leaves as SPEC JSON
//! (`ProxyError::to_response`); nothing else in the pipeline renders one.
//!
//! While the proxy hands over to a new binary, it also closes HTTP/1
//! keep-alive connections the one safe way, after an answer that says
//! `Connection: close` (Envoy's drain does the same).

use super::super::body::ProxyBody;
use super::{Failed, Forwarded, Inbound};
use http::header::CONNECTION;
use http::{HeaderValue, Response, Version};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use tower::{Layer, Service};

/// Adds [`Respond`].
pub(crate) struct RespondLayer {
    closing: Arc<AtomicBool>,
}

impl RespondLayer {
    /// Answers say `Connection: close` (HTTP/1) once `closing` is set.
    pub(crate) fn new(closing: Arc<AtomicBool>) -> RespondLayer {
        RespondLayer { closing }
    }
}

impl<S> Layer<S> for RespondLayer {
    type Service = Respond<S>;
    fn layer(&self, inner: S) -> Respond<S> {
        Respond {
            inner,
            closing: self.closing.clone(),
        }
    }
}

/// Turns the inner service's failures into the proxy's answers.
pub(crate) struct Respond<S> {
    inner: S,
    closing: Arc<AtomicBool>,
}

impl<S, B, R> Service<Inbound<R>> for Respond<S>
where
    S: Service<Inbound<R>, Response = Forwarded<B>, Error = Failed>,
    B: From<ProxyBody>,
{
    type Response = Response<B>;
    type Error = Infallible;
    type Future = RespondFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Layers below never fail to become ready; if one did, its error is
        // answered when the request is called.
        let _ = ready!(self.inner.poll_ready(cx));
        Poll::Ready(Ok(()))
    }

    // Always inlined, as is every `call` down to `route`: the future each
    // returns is built in place in the one hyper keeps, not copied per layer.
    #[inline(always)]
    fn call(&mut self, inbound: Inbound<R>) -> Self::Future {
        // HTTP/2 connections are closed with GOAWAY by the drain itself.
        let close = inbound.req.version() < Version::HTTP_2 && self.closing.load(Ordering::Relaxed);
        RespondFuture {
            inner: self.inner.call(inbound),
            close,
        }
    }
}

pin_project_lite::pin_project! {
    /// The inner result, with a failure turned into an answer.
    pub(crate) struct RespondFuture<F> {
        #[pin]
        inner: F,
        // The answer says `Connection: close`.
        close: bool,
    }
}

impl<F, B> Future for RespondFuture<F>
where
    F: Future<Output = Result<Forwarded<B>, Failed>>,
    B: From<ProxyBody>,
{
    type Output = Result<Response<B>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = match ready!(this.inner.poll(cx)) {
            Ok(forwarded) => forwarded.response,
            Err(failed) => failed
                .error
                .to_response()
                .map(|body| B::from(body.holding(failed.admitted))),
        };
        if *this.close {
            response
                .headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        Poll::Ready(Ok(response))
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::error::ProxyError;
    use super::super::Trail;
    use super::*;

    #[tokio::test]
    async fn a_failure_becomes_the_spec_answer() {
        let failed = Failed {
            admitted: None,
            error: ProxyError::Overloaded {
                reason: "too many requests in flight",
                partition: Some(3),
            },
            trail: Trail::default(),
        };
        let response = RespondFuture {
            inner: std::future::ready(Err::<Forwarded<ProxyBody>, _>(failed)),
            close: false,
        }
        .await
        .unwrap();
        assert_eq!(response.status(), 503);
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap()
            .to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["error"], "overloaded", "{json}");
    }

    #[tokio::test]
    async fn a_forwarded_response_passes_untouched() {
        let forwarded = Forwarded {
            response: Response::new(ProxyBody::full("ok")),
            trail: Trail::default(),
        };
        let response = RespondFuture {
            inner: std::future::ready(Ok::<_, Failed>(forwarded)),
            close: false,
        }
        .await
        .unwrap();
        assert_eq!(response.status(), 200);
        assert!(!response.headers().contains_key(CONNECTION));
    }

    #[tokio::test]
    async fn while_handing_over_http1_answers_close_their_connection_and_http2_ones_do_not() {
        let closing = Arc::new(AtomicBool::new(true));
        let mut svc = RespondLayer::new(closing).layer(tower::service_fn(|_: Inbound<()>| {
            std::future::ready(Ok::<_, Failed>(Forwarded {
                response: Response::new(ProxyBody::full("ok")),
                trail: Trail::default(),
            }))
        }));
        for (version, closes) in [(Version::HTTP_11, true), (Version::HTTP_2, false)] {
            let mut inbound = super::super::tests::inbound(http::Request::new(()));
            *inbound.req.version_mut() = version;
            let response = svc.call(inbound).await.unwrap();
            assert_eq!(
                response.headers().get(CONNECTION).is_some(),
                closes,
                "{version:?}"
            );
        }
    }
}
