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
///
/// Over HTTP/2, the body's last chunk needs care. hyper waits for send
/// window before each frame, but once it has handed HTTP/2 the frame that
/// ends the stream it is done with the stream, and whatever of that frame
/// the client's window did not admit sits in HTTP/2's buffer with nothing to
/// time it. A client granting no more window kept the stream and the chunk
/// (a slice pinning the upstream's whole read buffer, up to 64 KiB) for the
/// life of the connection. So a chunk that may be the last (the body's
/// length says so, or the body has no length and its end shows only after
/// its last chunk):
/// - of up to [`SMALL_TAIL`] bytes is sent as a copy: what such a stream can
///   keep is those bytes, counted by the memory bound like any allocation;
/// - of more has its last byte held back and sent as a frame of its own, so
///   hyper waits for the window the rest needs while the body (and the send
///   timeout's watch on it) is alive. One more frame per such response.
pub struct Streamed {
    body: UpstreamBody,
    _admitted: Option<Ticket>,
    /// An HTTP/2 stream's send timeout watches the body being polled.
    watch: Option<Watch>,
    /// HTTP/2: the byte held back from the last chunk, sent next.
    held: Option<Bytes>,
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
            held: None,
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
            ProxyBody::Upstream(u) => u.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Full(b) | ProxyBody::Answer(Answer { bytes: b, .. }) => b.is_none(),
            ProxyBody::Upstream(u) => u.held.is_none() && u.body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Full(b) | ProxyBody::Answer(Answer { bytes: b, .. }) => {
                SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64))
            }
            ProxyBody::Upstream(u) => {
                let hint = u.body.size_hint();
                let held = u.held.as_ref().map_or(0, |b| b.len() as u64);
                let mut sum = SizeHint::new();
                sum.set_lower(hint.lower() + held);
                if let Some(upper) = hint.upper() {
                    sum.set_upper(upper + held);
                }
                sum
            }
        }
    }
}

/// The largest last chunk of an HTTP/2 response sent whole (see
/// [`Streamed`]): at 256 streams a connection, 1 MiB is the most a client
/// can keep untimed, and the usual small answer pays no extra frame.
const SMALL_TAIL: usize = 4096;

impl Streamed {
    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let Some(watch) = &self.watch else {
            return Pin::new(&mut self.body).poll_frame(cx);
        };
        watch.polled();
        if let Some(byte) = self.held.take() {
            return Poll::Ready(Some(Ok(Frame::data(byte))));
        }
        let frame = match Pin::new(&mut self.body).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            other => return other,
        };
        let data = match frame.into_data() {
            Ok(data) => data,
            Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
        };
        let maybe_last = self.body.is_end_stream() || self.body.size_hint().exact().is_none();
        let (now, held) = last_chunk(data, maybe_last);
        self.held = held;
        Poll::Ready(Some(Ok(Frame::data(now))))
    }
}

/// An HTTP/2 response chunk as it is to be sent (see [`Streamed`]): what to
/// send now, and the byte to send after it.
fn last_chunk(mut data: Bytes, maybe_last: bool) -> (Bytes, Option<Bytes>) {
    if !maybe_last || data.len() <= 1 {
        (data, None)
    } else if data.len() <= SMALL_TAIL {
        (Bytes::copy_from_slice(&data), None)
    } else {
        let byte = data.split_off(data.len() - 1);
        (data, Some(byte))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chunk as hyper hands it over: a slice of the upstream's read buffer.
    fn slice_of_read_buffer(len: usize) -> (Bytes, Bytes) {
        let buffer = Bytes::from(vec![7u8; 64 * 1024]);
        (buffer.slice(100..100 + len), buffer)
    }

    /// Whether a chunk of `len` bytes is sent as it came, the same slice whole.
    fn goes_as_it_came(len: usize, maybe_last: bool) -> bool {
        let (chunk, _) = slice_of_read_buffer(len);
        let (now, held) = last_chunk(chunk.clone(), maybe_last);
        now.as_ptr() == chunk.as_ptr() && now.len() == len && held.is_none()
    }

    #[test]
    fn a_chunk_that_is_not_the_last_goes_as_it_came() {
        assert!(goes_as_it_came(10_000, false));
        assert!(goes_as_it_came(SMALL_TAIL, false));
    }

    #[test]
    fn a_small_last_chunk_goes_whole_without_pinning_the_upstreams_buffer() {
        let (chunk, buffer) = slice_of_read_buffer(SMALL_TAIL);
        let (now, held) = last_chunk(chunk.clone(), true);
        assert_eq!(now, chunk);
        assert!(held.is_none());
        let within = buffer.as_ptr_range();
        assert!(!within.contains(&now.as_ptr()), "a copy, not a slice");
    }

    #[test]
    fn a_large_last_chunk_keeps_its_last_byte_for_a_frame_of_its_own() {
        let (chunk, _) = slice_of_read_buffer(SMALL_TAIL + 1);
        let (now, held) = last_chunk(chunk.clone(), true);
        assert_eq!(now.len(), SMALL_TAIL);
        let held = held.expect("the last byte is held back");
        assert_eq!([now, held].concat(), chunk);
    }

    #[test]
    fn one_byte_needs_no_care() {
        assert!(goes_as_it_came(1, true));
    }
}
