//! W3C Trace Context: continue a client's `traceparent` or start one.
//!
//! The proxy is a hop in the trace: it keeps the trace id and flags, and sends
//! its own span id upstream as the parent id.

use bytes::Bytes;
use http::HeaderValue;
use std::fmt;

/// A trace id and the span id this hop sends upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceContext {
    /// 128-bit trace id.
    pub trace_id: u128,
    /// This hop's span id (the upstream's parent id).
    pub span_id: u64,
    /// Trace flags (bit 0: sampled).
    pub flags: u8,
    /// The client's span id, when its trace was continued (0: none); the
    /// parent of the span this hop exports.
    pub parent_id: u64,
}

/// The trace id as 32 lower-case hex digits.
pub struct TraceId(pub u128);

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

fn hex<const N: usize>(s: &[u8]) -> Option<u128> {
    if s.len() != N || !s.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    u128::from_str_radix(std::str::from_utf8(s).ok()?, 16).ok()
}

fn nonzero_span() -> u64 {
    loop {
        let id = rand::random::<u64>();
        if id != 0 {
            return id;
        }
    }
}

impl TraceContext {
    /// Continue the trace in `header` if it is valid, else start a new one.
    ///
    /// Returns the context and whether the incoming header was continued
    /// (callers drop `tracestate` when it was not).
    pub fn continue_or_start(header: Option<&HeaderValue>) -> (TraceContext, bool) {
        match header.and_then(|h| TraceContext::parse(h.as_bytes())) {
            Some((trace_id, parent_id, flags)) => (
                TraceContext {
                    trace_id,
                    span_id: nonzero_span(),
                    flags,
                    parent_id,
                },
                true,
            ),
            None => (TraceContext::start(), false),
        }
    }

    /// A new sampled trace.
    pub fn start() -> TraceContext {
        let trace_id = loop {
            let id = rand::random::<u128>();
            if id != 0 {
                break id;
            }
        };
        TraceContext {
            trace_id,
            span_id: nonzero_span(),
            flags: 0x01,
            parent_id: 0,
        }
    }

    /// Parse `version-traceid-parentid-flags`; returns the trace id, parent
    /// id and flags.
    fn parse(v: &[u8]) -> Option<(u128, u64, u8)> {
        if v.len() < 55 {
            return None;
        }
        let version = hex::<2>(&v[0..2])? as u8;
        // Version ff is invalid; version 00 must be exactly 55 bytes; later
        // versions may append fields after a dash.
        if version == 0xff || (version == 0 && v.len() != 55) || (v.len() > 55 && v[55] != b'-') {
            return None;
        }
        if v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
            return None;
        }
        let trace_id = hex::<32>(&v[3..35])?;
        let parent = hex::<16>(&v[36..52])?;
        let flags = hex::<2>(&v[53..55])? as u8;
        (trace_id != 0 && parent != 0).then_some((trace_id, parent as u64, flags))
    }

    /// The `traceparent` to send upstream.
    pub fn header(&self) -> HeaderValue {
        let mut buf = *b"00-00000000000000000000000000000000-0000000000000000-00";
        buf[3..11].copy_from_slice(&hex8((self.trace_id >> 96) as u32));
        buf[11..19].copy_from_slice(&hex8((self.trace_id >> 64) as u32));
        buf[19..27].copy_from_slice(&hex8((self.trace_id >> 32) as u32));
        buf[27..35].copy_from_slice(&hex8(self.trace_id as u32));
        buf[36..44].copy_from_slice(&hex8((self.span_id >> 32) as u32));
        buf[44..52].copy_from_slice(&hex8(self.span_id as u32));
        buf[53..55].copy_from_slice(&hex8(u32::from(self.flags))[6..]);
        // Shared from the start: the request's kept copy clones this value,
        // and a value copied into a plain buffer allocates again when cloned.
        HeaderValue::from_maybe_shared(Bytes::from_owner(buf))
            .unwrap_or_else(|_| HeaderValue::from_static("00-0-0-00"))
    }
}

/// `v` as 8 lower-case hex digits.
///
/// Eight digits at a time in one u64 rather than a table lookup per digit:
/// this runs for every request, and digit by digit cost ~1 % of a request.
fn hex8(v: u32) -> [u8; 8] {
    // Spread the nibbles out, one per byte, lowest nibble in the lowest byte.
    let mut x = u64::from(v);
    x = ((x & 0xffff_0000) << 16) | (x & 0xffff);
    x = ((x & 0x0000_ff00_0000_ff00) << 8) | (x & 0x0000_00ff_0000_00ff);
    x = ((x & 0x00f0_00f0_00f0_00f0) << 4) | (x & 0x000f_000f_000f_000f);
    // Per byte: '0' + n, plus the gap up to 'a' where n >= 10 (n + 6 carries into bit 4).
    let letters = ((x + 0x0606_0606_0606_0606) >> 4) & 0x0101_0101_0101_0101;
    (x + 0x3030_3030_3030_3030 + letters * 0x27).to_be_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn continues_a_valid_parent_with_a_new_span() {
        let (ctx, continued) =
            TraceContext::continue_or_start(Some(&HeaderValue::from_static(GOOD)));
        assert!(continued);
        assert_eq!(ctx.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(
            ctx.parent_id, 0x00f067aa0ba902b7,
            "the client's span is the parent"
        );
        let out = ctx.header();
        let out = out.to_str().unwrap();
        assert!(out.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert!(!out.contains("00f067aa0ba902b7"), "a new parent id");
        assert!(out.ends_with("-01"));
    }

    #[test]
    fn starts_fresh_on_anything_invalid() {
        for bad in [
            "",
            "garbage",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            let (_, continued) =
                TraceContext::continue_or_start(Some(&HeaderValue::from_str(bad).unwrap()));
            assert!(!continued, "{bad:?}");
        }
        let later_version = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra";
        let (_, continued) =
            TraceContext::continue_or_start(Some(&HeaderValue::from_static(later_version)));
        assert!(continued, "future versions may append fields");
    }

    #[test]
    fn the_header_is_formatted_exactly() {
        let ctx = TraceContext {
            trace_id: 0x4bf92f3577b34da6a3ce929d0e0e4736,
            span_id: 0x00f067aa0ba902b7,
            flags: 1,
            parent_id: 0,
        };
        assert_eq!(ctx.header(), GOOD);
    }

    #[test]
    fn hex_digits_match_the_standard_formatter() {
        let mut v: u32 = 0x9e37_79b9;
        for fixed in [
            0,
            1,
            9,
            10,
            15,
            16,
            0xa0,
            0xffff_ffff,
            0x0123_4567,
            0x89ab_cdef,
        ] {
            assert_eq!(hex8(fixed), format!("{fixed:08x}").as_bytes(), "{fixed:#x}");
        }
        for _ in 0..10_000 {
            v = v.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            assert_eq!(hex8(v), format!("{v:08x}").as_bytes(), "{v:#x}");
        }
    }

    #[test]
    fn started_headers_are_well_formed() {
        let h = TraceContext::start().header();
        assert!(TraceContext::parse(h.as_bytes()).is_some(), "{h:?}");
    }
}
