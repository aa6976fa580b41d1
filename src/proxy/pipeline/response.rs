//! Stage 6, response: the upstream's answer with the header rules of SPEC §3
//! applied, its body streamed back (`UpstreamBody`: bounded by the request's
//! deadline, its connection pooled again only after a clean end).

use super::super::body::ProxyBody;
use super::super::headers;
use super::super::stall::Watch;
use super::Ticket;
use crate::routing::{Role, RoutePartition, ServedBy};
use crate::upstream::{Conn, InflightGuard, Upload, UpstreamBody};
use http::{HeaderValue, Response, Version};
use hyper::body::Incoming;
use std::sync::Arc;
use tokio::time::Instant;

/// An upstream's response, with what it needs to stream back.
pub(crate) struct Delivered {
    pub(crate) resp: Response<Incoming>,
    pub(crate) conn: Conn,
    pub(crate) guard: InflightGuard,
    pub(crate) role: Role,
    /// When its head arrived.
    pub(crate) answered_at: Instant,
}

/// Who served a response, for the trail.
pub(crate) struct Served {
    pub(crate) by: ServedBy,
    pub(crate) upstream: Arc<str>,
    pub(crate) at: Instant,
}

/// The response to send the client for `d`, from `partition`; the upstream's
/// address is named only when `expose_upstream`.
///
/// `upload` is the request's body if the client is still sending it. The
/// body keeps flowing to the upstream while the answer streams (an upstream
/// may answer early and read on), but the client's connection can carry no
/// further request before that body ends, so the answer says
/// `Connection: close`; whatever is left unsent when the answer ends is cut
/// off (as Envoy does, and nginx's lingering close).
pub(crate) fn reply(
    d: Delivered,
    partition: &RoutePartition,
    expose_upstream: bool,
    deadline: Instant,
    upload: Option<Upload>,
    admitted: Option<Ticket>,
) -> (Response<ProxyBody>, Served) {
    let upstream = d.guard.upstream().label().clone();
    let served = Served {
        by: d.role.into(),
        upstream: upstream.clone(),
        at: d.answered_at,
    };
    let (mut parts, incoming) = d.resp.into_parts();
    // The client connection's protocol, not the upstream's, frames the answer.
    parts.version = Version::HTTP_11;
    let exposed = expose_upstream.then_some(&*upstream);
    headers::to_downstream(&mut parts.headers, &partition.index_header, exposed);
    if upload.is_some() {
        parts
            .headers
            .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
    let body = UpstreamBody::new(incoming, d.guard, d.conn, deadline, d.answered_at, upload);
    (
        Response::from_parts(
            parts,
            ProxyBody::upstream(body, admitted, Watch::current(deadline)),
        ),
        served,
    )
}
