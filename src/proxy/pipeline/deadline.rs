//! Deadline, a layer: every request gets its one overall deadline here
//! (`[timeouts] overall` from its arrival).
//!
//! It is enforced where the request waits — each attempt's timer, the
//! backoff between attempts, a write held through a failover, the streamed
//! response body — not by a timer of its own: those waits already bound every
//! await of the request, and a second timer per request would cost a
//! timer-wheel insertion and removal for nothing.

use super::{Bounded, Inbound};
use std::task::{Context, Poll};
use tower::{Layer, Service};

/// Adds [`Deadline`].
pub(crate) struct DeadlineLayer;

impl<S> Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;
    fn layer(&self, inner: S) -> Deadline<S> {
        Deadline { inner }
    }
}

/// Gives each request its overall deadline.
pub(crate) struct Deadline<S> {
    inner: S,
}

impl<S: Service<Bounded<B>>, B> Service<Inbound<B>> for Deadline<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    #[inline(always)] // see `observe`
    fn call(&mut self, inbound: Inbound<B>) -> S::Future {
        let deadline = inbound.arrived + inbound.snapshot.settings.timeouts.overall;
        self.inner.call(Bounded { inbound, deadline })
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::inbound;
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn the_deadline_is_the_overall_timeout_from_arrival() {
        let mut svc = DeadlineLayer.layer(tower::service_fn(|b: Bounded<()>| async move {
            Ok::<_, std::convert::Infallible>(b.deadline - b.inbound.arrived)
        }));
        let inbound = inbound(http::Request::new(()));
        tokio::time::advance(Duration::from_secs(3)).await;
        let given = svc.call(inbound).await.unwrap();
        assert_eq!(
            given,
            Duration::from_secs(30),
            "the shipped default, from arrival"
        );
    }
}
