//! The body of every response the proxy sends: the upstream's, streamed, or
//! one the proxy wrote itself.

use super::pipeline::Ticket;
use super::stall::Watch;
use crate::upstream::{BodyError, UpstreamBody};
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use std::pin::Pin;
use std::task::{Context, Poll};

/// A response body.
pub enum ProxyBody {
    /// Written by the proxy (errors, admin pages).
    Full(Option<Bytes>),
    /// Written by the proxy for a client request, holding its place as
    /// [`Streamed`] does.
    Answer(Answer),
    /// Streamed from an upstream.
    Upstream(Streamed),
}

/// An upstream's body, holding its request's place under the in-flight
/// limit until it is done (hyper drops a body as it ends).
pub struct Streamed {
    body: UpstreamBody,
    _admitted: Option<Ticket>,
    /// An HTTP/2 stream's send timeout watches the body being polled.
    watch: Option<Watch>,
}

/// The proxy's own answer to a request, holding its ticket.
pub struct Answer {
    bytes: Option<Bytes>,
    _admitted: Ticket,
}

impl ProxyBody {
    /// This body, holding `admitted` (if any) until it is done.
    pub(crate) fn holding(self, admitted: Option<Ticket>) -> ProxyBody {
        match (self, admitted) {
            (ProxyBody::Full(bytes), Some(t)) => ProxyBody::Answer(Answer {
                bytes,
                _admitted: t,
            }),
            (body, _) => body,
        }
    }

    /// `body`, holding `admitted` until it is dropped.
    pub(crate) fn upstream(
        body: UpstreamBody,
        admitted: Option<Ticket>,
        watch: Option<Watch>,
    ) -> ProxyBody {
        ProxyBody::Upstream(Streamed {
            body,
            _admitted: admitted,
            watch,
        })
    }
}

impl ProxyBody {
    /// A complete body.
    pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
        let b = bytes.into();
        ProxyBody::Full((!b.is_empty()).then_some(b))
    }

    /// No body.
    pub fn empty() -> ProxyBody {
        ProxyBody::Full(None)
    }
}

impl From<Bytes> for ProxyBody {
    fn from(b: Bytes) -> ProxyBody {
        ProxyBody::full(b)
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            ProxyBody::Full(b) | ProxyBody::Answer(Answer { bytes: b, .. }) => {
                Poll::Ready(b.take().map(|b| Ok(Frame::data(b))))
            }
            ProxyBody::Upstream(u) => {
                if let Some(w) = &u.watch {
                    w.polled();
                }
                Pin::new(&mut u.body).poll_frame(cx)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Full(b) | ProxyBody::Answer(Answer { bytes: b, .. }) => b.is_none(),
            ProxyBody::Upstream(u) => u.body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Full(b) | ProxyBody::Answer(Answer { bytes: b, .. }) => {
                SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64))
            }
            ProxyBody::Upstream(u) => u.body.size_hint(),
        }
    }
}
