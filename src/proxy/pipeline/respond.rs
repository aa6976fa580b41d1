//! Respond, a layer: where the proxy's own answers become responses. Every
//! error raised below — a shed request, a missing key, an upstream that
//! failed — arrives here as a [`Failed`] and leaves as SPEC JSON
//! (`ProxyError::to_response`); nothing else in the pipeline renders one.

use super::super::body::ProxyBody;
use super::{Answered, Failed, Forwarded, Inbound};
use crate::routing::ServedBy;
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
    type Response = Answered<B>;
    type Error = Infallible;
    type Future = RespondFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Layers below never fail to become ready; if one did, its error is
        // answered when the request is called.
        let _ = ready!(self.inner.poll_ready(cx));
        Poll::Ready(Ok(()))
    }

    #[inline]
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
    type Output = Result<Answered<B>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Poll::Ready(Ok(match ready!(self.project().inner.poll(cx)) {
            Ok(Forwarded { response, trail }) => Answered {
                response,
                trail,
                error: None,
            },
            Err(Failed { error, mut trail }) => {
                trail.served_by = ServedBy::Proxy;
                Answered {
                    response: error.to_response().map(B::from),
                    trail,
                    error: Some(error.code()),
                }
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::error::ProxyError;
    use super::super::Trail;
    use super::*;
    use http::Response;

    #[tokio::test]
    async fn a_failure_becomes_the_spec_answer_and_keeps_its_trail() {
        let failed = Failed {
            error: ProxyError::Overloaded {
                reason: "too many requests in flight",
                partition: Some(3),
            },
            trail: Trail {
                attempts: 2,
                served_by: ServedBy::Primary,
                ..Trail::default()
            },
        };
        let answered = RespondFuture {
            inner: std::future::ready(Err::<Forwarded<ProxyBody>, _>(failed)),
        }
        .await
        .unwrap();
        assert_eq!(answered.response.status(), 503);
        assert_eq!(answered.error, Some("overloaded"));
        assert_eq!(answered.trail.attempts, 2);
        assert_eq!(answered.trail.served_by, ServedBy::Proxy);
    }

    #[tokio::test]
    async fn a_forwarded_response_passes_untouched() {
        let forwarded = Forwarded {
            response: Response::new(ProxyBody::full("ok")),
            trail: Trail::default(),
        };
        let answered = RespondFuture {
            inner: std::future::ready(Ok::<_, Failed>(forwarded)),
        }
        .await
        .unwrap();
        assert_eq!(answered.response.status(), 200);
        assert_eq!(answered.error, None);
    }
}
