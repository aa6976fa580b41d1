//! The request body on its way upstream: streamed once and capped, or kept
//! (within a buffer limit) so a later attempt can send it again.

use super::BodyError;
use bytes::{Buf, Bytes};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

/// What every copy of a replayable body shares.
pub struct ReplayState {
    source: Option<Incoming>,
    /// Everything read so far, while it fits in `limit`.
    chunks: Vec<Bytes>,
    buffered: usize,
    limit: usize,
    overflowed: bool,
    broken: bool,
    trailers: Option<HeaderMap>,
    seen: u64,
    max_body: u64,
    generation: u64,
}

/// One attempt's view of a replayable body.
struct ReplayHandle {
    shared: Arc<Mutex<ReplayState>>,
    generation: u64,
    pos: usize,
    trailers_sent: bool,
    size_hint: SizeHint,
}

enum Kind {
    Empty,
    Stream {
        inner: Incoming,
        seen: u64,
        max_body: u64,
    },
    Replay(ReplayHandle),
}

/// The body of a request on its way upstream.
pub struct RequestBody {
    kind: Kind,
}

impl RequestBody {
    /// No body.
    pub fn empty() -> RequestBody {
        RequestBody { kind: Kind::Empty }
    }

    /// Stream `inner` once, refusing more than `max_body` bytes.
    pub fn streaming(inner: Incoming, max_body: u64) -> RequestBody {
        RequestBody {
            kind: Kind::Stream {
                inner,
                seen: 0,
                max_body,
            },
        }
    }

    /// Stream `inner`, keeping up to `buffer_limit` bytes so it can be sent again.
    pub fn replayable(inner: Incoming, buffer_limit: usize, max_body: u64) -> RequestBody {
        let size_hint = inner.size_hint();
        RequestBody {
            kind: Kind::Replay(ReplayHandle {
                shared: Arc::new(Mutex::new(ReplayState {
                    source: Some(inner),
                    chunks: Vec::new(),
                    buffered: 0,
                    limit: buffer_limit,
                    overflowed: false,
                    broken: false,
                    trailers: None,
                    seen: 0,
                    max_body,
                    generation: 0,
                })),
                generation: 0,
                pos: 0,
                trailers_sent: false,
                size_hint,
            }),
        }
    }

    /// What can make copies of this body for later attempts, if anything can.
    pub fn replayer(&self) -> Option<Replayer> {
        match &self.kind {
            Kind::Empty => Some(Replayer::Empty),
            Kind::Stream { .. } => None,
            Kind::Replay(h) => Some(Replayer::Shared {
                shared: h.shared.clone(),
                size_hint: h.size_hint,
            }),
        }
    }
}

/// Makes copies of a request body for retries.
pub enum Replayer {
    /// The body is empty; every copy is empty.
    Empty,
    /// Copies replay what was kept, then continue from the client.
    Shared {
        /// State shared by every copy.
        shared: Arc<Mutex<ReplayState>>,
        /// The original body's size hint.
        size_hint: SizeHint,
    },
}

impl Replayer {
    /// Whether a copy could be made now (nothing read has been discarded).
    pub fn can_replay(&self) -> bool {
        match self {
            Replayer::Empty => true,
            Replayer::Shared { shared, .. } => {
                let st = shared.lock().unwrap_or_else(|e| e.into_inner());
                !st.overflowed && !st.broken
            }
        }
    }

    /// A fresh copy for another attempt, if everything read so far was kept.
    ///
    /// The copy supersedes every earlier one: an abandoned attempt still being
    /// polled by its connection gets an error rather than stealing data.
    pub fn next(&self) -> Option<RequestBody> {
        match self {
            Replayer::Empty => Some(RequestBody::empty()),
            Replayer::Shared { shared, size_hint } => {
                let mut st = shared.lock().unwrap_or_else(|e| e.into_inner());
                if st.overflowed || st.broken {
                    return None;
                }
                st.generation += 1;
                Some(RequestBody {
                    kind: Kind::Replay(ReplayHandle {
                        shared: shared.clone(),
                        generation: st.generation,
                        pos: 0,
                        trailers_sent: false,
                        size_hint: *size_hint,
                    }),
                })
            }
        }
    }
}

fn too_large(seen: u64, max_body: u64) -> Option<BodyError> {
    (seen > max_body).then_some(BodyError::TooLarge { limit: max_body })
}

impl ReplayHandle {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let mut st = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        if st.generation != self.generation {
            return Poll::Ready(Some(Err(BodyError::Superseded)));
        }
        if let Some(chunk) = st.chunks.get(self.pos) {
            self.pos += 1;
            return Poll::Ready(Some(Ok(Frame::data(chunk.clone()))));
        }
        let Some(source) = st.source.as_mut() else {
            if !self.trailers_sent {
                self.trailers_sent = true;
                if let Some(t) = st.trailers.clone() {
                    return Poll::Ready(Some(Ok(Frame::trailers(t))));
                }
            }
            return Poll::Ready(None);
        };
        match ready!(Pin::new(source).poll_frame(cx)) {
            Some(Ok(frame)) => {
                let frame = match frame.into_data() {
                    Ok(data) => {
                        st.seen += data.len() as u64;
                        if let Some(e) = too_large(st.seen, st.max_body) {
                            st.broken = true;
                            return Poll::Ready(Some(Err(e)));
                        }
                        if !st.overflowed {
                            if st.buffered + data.len() > st.limit {
                                st.overflowed = true;
                                st.chunks = Vec::new();
                                st.buffered = 0;
                            } else {
                                st.buffered += data.len();
                                st.chunks.push(data.clone());
                            }
                        }
                        self.pos = st.chunks.len();
                        Frame::data(data)
                    }
                    Err(frame) => {
                        if let Some(t) = frame.trailers_ref() {
                            st.trailers = Some(t.clone());
                            self.trailers_sent = true;
                        }
                        frame
                    }
                };
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                st.broken = true;
                st.source = None;
                Poll::Ready(Some(Err(BodyError::Client(e))))
            }
            None => {
                st.source = None;
                Poll::Ready(None)
            }
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match &mut self.get_mut().kind {
            Kind::Empty => Poll::Ready(None),
            Kind::Stream {
                inner,
                seen,
                max_body,
            } => match ready!(Pin::new(inner).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    if let Some(d) = frame.data_ref() {
                        *seen += d.remaining() as u64;
                        if let Some(e) = too_large(*seen, *max_body) {
                            return Poll::Ready(Some(Err(e)));
                        }
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Some(Err(e)) => Poll::Ready(Some(Err(BodyError::Client(e)))),
                None => Poll::Ready(None),
            },
            Kind::Replay(h) => h.poll(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Empty => true,
            Kind::Stream { inner, .. } => inner.is_end_stream(),
            Kind::Replay(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Empty => SizeHint::with_exact(0),
            Kind::Stream { inner, .. } => inner.size_hint(),
            Kind::Replay(h) => h.size_hint,
        }
    }
}
