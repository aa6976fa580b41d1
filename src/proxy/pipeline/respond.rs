//! Respond, a layer: where the proxy's own answers become responses. Every
//! error raised below — a shed request, a missing key, an upstream that
//! failed — arrives here as a [`Failed`] and leaves as SPEC JSON
//! (`ProxyError::to_response`); nothing else in the pipeline renders one.

use super::super::body::ProxyBody;
use super::{Failed, Forwarded, Inbound};
use http::Response;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tower::{Layer, Service};

/// Adds [`Respond`].
pub(crate) struct RespondLayer;

impl<S> Layer<S> for RespondLayer {
    type Service = Respond<S>;
    fn layer(&self, inner: S) -> Respond<S> {
        Respond { inner }
    }
}

/// Turns the inner service's failures into the proxy's answers.
pub(crate) struct Respond<S> {
    inner: S,
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
        RespondFuture {
            inner: self.inner.call(inbound),
        }
    }
}

pin_project_lite::pin_project! {
    /// The inner result, with a failure turned into an answer.
    pub(crate) struct RespondFuture<F> {
        #[pin]
        inner: F,
    }
}

impl<F, B> Future for RespondFuture<F>
where
    F: Future<Output = Result<Forwarded<B>, Failed>>,
    B: From<ProxyBody>,
{
    type Output = Result<Response<B>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Poll::Ready(Ok(match ready!(self.project().inner.poll(cx)) {
            Ok(forwarded) => forwarded.response,
            Err(failed) => failed.error.to_response().map(B::from),
        }))
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
            error: ProxyError::Overloaded {
                reason: "too many requests in flight",
                partition: Some(3),
            },
            trail: Trail::default(),
        };
        let response = RespondFuture {
            inner: std::future::ready(Err::<Forwarded<ProxyBody>, _>(failed)),
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
        }
        .await
        .unwrap();
        assert_eq!(response.status(), 200);
    }
}
