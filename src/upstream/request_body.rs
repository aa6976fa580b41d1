//! The request body on its way upstream: streamed once and capped, or kept
//! (within a buffer limit) so a later attempt can send it again.
//!
//! Every non-empty body's state is shared between the attempts that send it
//! and the response that answers it ([`Upload`]): an upstream may answer
//! before it has read the whole body, and once its answer is complete the
//! rest of the client's body is cut off, never left unread and unanswered.
//!
//! Generic over the client's body only so these rules can be tested without
//! a connection; the proxy sends hyper's `Incoming`.

use super::BodyError;
use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};

/// What a client's body must be to be sent upstream.
pub trait Source:
    Body<Data = Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>> + Unpin
{
}

impl<B> Source for B where
    B: Body<Data = Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>> + Unpin
{
}

/// What every copy of a body, and its [`Upload`], share.
pub struct ReplayState<B = Incoming> {
    /// The client's body, until it ends, breaks or is cut off.
    source: Option<B>,
    /// Everything read so far, while it fits in `limit` (and the body may be
    /// sent again at all).
    chunks: Vec<Bytes>,
    buffered: usize,
    limit: usize,
    /// Something read was not kept: no copy can be made.
    overflowed: bool,
    broken: bool,
    /// The rest of the body was cut off after the upstream's answer ended.
    cut: bool,
    trailers: Option<HeaderMap>,
    seen: u64,
    max_body: u64,
    generation: u64,
}

fn lock<B>(m: &Mutex<ReplayState<B>>) -> MutexGuard<'_, ReplayState<B>> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One attempt's view of a body.
struct ReplayHandle<B> {
    shared: Arc<Mutex<ReplayState<B>>>,
    generation: u64,
    pos: usize,
    trailers_sent: bool,
    size_hint: SizeHint,
}

enum Kind<B> {
    Empty,
    Shared(ReplayHandle<B>),
}

/// The body of a request on its way upstream.
pub struct RequestBody<B = Incoming> {
    kind: Kind<B>,
}

impl<B: Source> RequestBody<B> {
    /// No body.
    pub fn empty() -> RequestBody<B> {
        RequestBody { kind: Kind::Empty }
    }

    /// Stream `inner` once, refusing more than `max_body` bytes.
    pub fn streaming(inner: B, max_body: u64) -> RequestBody<B> {
        RequestBody::shared(inner, None, max_body)
    }

    /// Stream `inner`, keeping up to `buffer_limit` bytes so it can be sent again.
    pub fn replayable(inner: B, buffer_limit: usize, max_body: u64) -> RequestBody<B> {
        RequestBody::shared(inner, Some(buffer_limit), max_body)
    }

    fn shared(inner: B, keep: Option<usize>, max_body: u64) -> RequestBody<B> {
        let size_hint = inner.size_hint();
        RequestBody {
            kind: Kind::Shared(ReplayHandle {
                shared: Arc::new(Mutex::new(ReplayState {
                    source: Some(inner),
                    chunks: Vec::new(),
                    buffered: 0,
                    limit: keep.unwrap_or(0),
                    // A streamed body keeps nothing from the start.
                    overflowed: keep.is_none(),
                    broken: false,
                    cut: false,
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
    pub fn replayer(&self) -> Option<Replayer<B>> {
        match &self.kind {
            Kind::Empty => Some(Replayer::Empty),
            Kind::Shared(h) if lock(&h.shared).overflowed => None,
            Kind::Shared(h) => Some(Replayer::Shared {
                shared: h.shared.clone(),
                size_hint: h.size_hint,
            }),
        }
    }

    /// How the response sees this body; `None` for an empty one, which is
    /// always complete.
    pub fn upload(&self) -> Option<Upload<B>> {
        match &self.kind {
            Kind::Empty => None,
            Kind::Shared(h) => Some(Upload(h.shared.clone())),
        }
    }
}

/// A request body as its response sees it: finished, or still coming from
/// the client.
pub struct Upload<B = Incoming>(Arc<Mutex<ReplayState<B>>>);

impl<B: Source> Upload<B> {
    /// Whether the client is still to send some of the body.
    pub fn unfinished(&self) -> bool {
        let st = lock(&self.0);
        !st.cut && st.source.as_ref().is_some_and(|s| !s.is_end_stream())
    }

    /// The upstream's answer is complete: whatever of the body the client
    /// still has to send is cut off (the client's body is dropped, so its
    /// connection reads no more of it and closes after the response), and
    /// the attempt sending it waits forever rather than end the body early.
    /// Returns whether anything was cut; the upstream connection that was
    /// sending it must then not be used again.
    pub fn cut_if_unfinished(&self) -> bool {
        let mut st = lock(&self.0);
        if st.cut || st.source.as_ref().is_none_or(Body::is_end_stream) {
            return false;
        }
        st.source = None;
        st.cut = true;
        st.broken = true;
        true
    }
}

/// Makes copies of a request body for retries.
pub enum Replayer<B = Incoming> {
    /// The body is empty; every copy is empty.
    Empty,
    /// Copies replay what was kept, then continue from the client.
    Shared {
        /// State shared by every copy.
        shared: Arc<Mutex<ReplayState<B>>>,
        /// The original body's size hint.
        size_hint: SizeHint,
    },
}

impl<B: Source> Replayer<B> {
    /// Whether a copy could be made now (nothing read has been discarded).
    pub fn can_replay(&self) -> bool {
        match self {
            Replayer::Empty => true,
            Replayer::Shared { shared, .. } => {
                let st = lock(shared);
                !st.overflowed && !st.broken
            }
        }
    }

    /// A fresh copy for another attempt, if everything read so far was kept.
    ///
    /// The copy supersedes every earlier one: an abandoned attempt still being
    /// polled by its connection gets an error rather than stealing data.
    pub fn next(&self) -> Option<RequestBody<B>> {
        match self {
            Replayer::Empty => Some(RequestBody::empty()),
            Replayer::Shared { shared, size_hint } => {
                let mut st = lock(shared);
                if st.overflowed || st.broken {
                    return None;
                }
                st.generation += 1;
                Some(RequestBody {
                    kind: Kind::Shared(ReplayHandle {
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

impl<B: Source> ReplayHandle<B> {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let mut st = lock(&self.shared);
        if st.generation != self.generation {
            return Poll::Ready(Some(Err(BodyError::Superseded)));
        }
        if st.cut {
            // Neither an end (the upstream would take a short body for a
            // whole one) nor an error (which would break the answer still
            // streaming on the same connection): this attempt sends no more.
            return Poll::Pending;
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
                Poll::Ready(Some(Err(BodyError::Client(e.into()))))
            }
            None => {
                st.source = None;
                Poll::Ready(None)
            }
        }
    }
}

impl<B: Source> Body for RequestBody<B> {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match &mut self.get_mut().kind {
            Kind::Empty => Poll::Ready(None),
            Kind::Shared(h) => h.poll(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.kind, Kind::Empty)
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Empty => SizeHint::with_exact(0),
            Kind::Shared(h) => h.size_hint,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    type Frames = tokio_stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, std::io::Error>>>;

    fn client(parts: &[&'static str]) -> StreamBody<Frames> {
        let frames: Vec<_> = parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes()))))
            .collect();
        StreamBody::new(tokio_stream::iter(frames))
    }

    async fn read_all<B: Source>(mut b: RequestBody<B>) -> Result<Vec<u8>, BodyError> {
        let mut out = Vec::new();
        while let Some(frame) = b.frame().await {
            if let Ok(d) = frame?.into_data() {
                out.extend_from_slice(&d);
            }
        }
        Ok(out)
    }

    #[tokio::test]
    async fn a_kept_body_is_sent_again_whole() {
        let body = RequestBody::replayable(client(&["ab", "cd", "ef"]), 64, 1024);
        let replayer = body.replayer().unwrap();
        assert_eq!(read_all(body).await.unwrap(), b"abcdef");
        assert!(replayer.can_replay());
        let again = replayer.next().unwrap();
        assert_eq!(read_all(again).await.unwrap(), b"abcdef");
    }

    #[tokio::test]
    async fn a_copy_takes_over_from_an_attempt_that_read_part_of_the_body() {
        let mut first = RequestBody::replayable(client(&["ab", "cd"]), 64, 1024);
        let replayer = first.replayer().unwrap();
        let chunk = first.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&chunk[..], b"ab");
        let second = replayer.next().unwrap();
        assert!(
            matches!(first.frame().await, Some(Err(BodyError::Superseded))),
            "the abandoned attempt may not steal the rest"
        );
        assert_eq!(
            read_all(second).await.unwrap(),
            b"abcd",
            "what was kept, then the rest from the client"
        );
    }

    #[tokio::test]
    async fn a_body_beyond_the_buffer_goes_through_once_and_cannot_be_replayed() {
        let body = RequestBody::replayable(client(&["abc", "def"]), 4, 1024);
        let replayer = body.replayer().unwrap();
        assert_eq!(read_all(body).await.unwrap(), b"abcdef");
        assert!(!replayer.can_replay());
        assert!(replayer.next().is_none());
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_refused_whichever_way_it_travels() {
        let kept = RequestBody::replayable(client(&["abc", "def"]), 64, 4);
        let replayer = kept.replayer().unwrap();
        assert!(matches!(
            read_all(kept).await,
            Err(BodyError::TooLarge { limit: 4 })
        ));
        assert!(!replayer.can_replay(), "a refused body is never sent again");
        let streamed = RequestBody::streaming(client(&["abc", "def"]), 4);
        assert!(streamed.replayer().is_none(), "a streamed body has no copy");
        assert!(matches!(
            read_all(streamed).await,
            Err(BodyError::TooLarge { limit: 4 })
        ));
    }

    #[tokio::test]
    async fn a_client_that_breaks_its_body_leaves_nothing_to_replay() {
        let frames: Vec<Result<Frame<Bytes>, std::io::Error>> = vec![
            Ok(Frame::data(Bytes::from_static(b"ab"))),
            Err(std::io::Error::other("client went away")),
        ];
        let body = RequestBody::replayable(StreamBody::new(tokio_stream::iter(frames)), 64, 1024);
        let replayer = body.replayer().unwrap();
        let err = read_all(body).await.unwrap_err();
        assert!(err.to_string().contains("client went away"), "{err}");
        assert!(!replayer.can_replay());
    }

    #[tokio::test]
    async fn trailers_are_replayed_too() {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-sum", "7".parse().unwrap());
        let frames: Vec<Result<Frame<Bytes>, std::io::Error>> = vec![
            Ok(Frame::data(Bytes::from_static(b"ab"))),
            Ok(Frame::trailers(trailers.clone())),
        ];
        let body = RequestBody::replayable(StreamBody::new(tokio_stream::iter(frames)), 64, 1024);
        let replayer = body.replayer().unwrap();
        let first = body.collect().await.unwrap();
        assert_eq!(first.trailers(), Some(&trailers));
        let again = replayer.next().unwrap().collect().await.unwrap();
        assert_eq!(again.trailers(), Some(&trailers));
        assert_eq!(&again.to_bytes()[..], b"ab");
    }

    #[tokio::test]
    async fn an_upload_still_coming_when_the_answer_ends_is_cut_off_and_never_ended_early() {
        let frames: Vec<Result<Frame<Bytes>, std::io::Error>> =
            vec![Ok(Frame::data(Bytes::from_static(b"ab")))];
        // A body that declares more than it has sent so far.
        let source = StreamBody::new(tokio_stream::iter(frames));
        let mut body = RequestBody::streaming(source, 1024);
        let upload = body.upload().unwrap();
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(&first.into_data().unwrap()[..], b"ab");
        // The stream above ends after one frame; it is finished once polled
        // to its end, and nothing is cut from a finished body.
        assert!(body.frame().await.is_none());
        assert!(!upload.unfinished());
        assert!(!upload.cut_if_unfinished());

        let pending =
            StreamBody::new(tokio_stream::pending::<Result<Frame<Bytes>, std::io::Error>>());
        let mut body = RequestBody::replayable(pending, 64, 1024);
        let upload = body.upload().unwrap();
        let replayer = body.replayer().unwrap();
        assert!(upload.unfinished(), "the client still owes the rest");
        assert!(upload.cut_if_unfinished());
        assert!(!upload.unfinished());
        assert!(!replayer.can_replay(), "a cut body is never sent again");
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        assert!(
            Pin::new(&mut body).poll_frame(&mut cx).is_pending(),
            "the attempt sends no more, but does not end the body early"
        );
    }

    #[tokio::test]
    async fn an_empty_body_is_always_replayable() {
        let body: RequestBody<StreamBody<Frames>> = RequestBody::empty();
        assert!(body.is_end_stream());
        assert!(body.upload().is_none(), "nothing to finish");
        let replayer = body.replayer().unwrap();
        assert!(replayer.can_replay());
        assert!(read_all(replayer.next().unwrap()).await.unwrap().is_empty());
    }
}
