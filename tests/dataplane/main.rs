//! Data plane integration tests: the in-process proxy against real upstream
//! HTTP servers on 127.0.0.1.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../support/mod.rs"]
mod support;

mod headers;
mod limits;
mod parking;
mod read_preference;
mod retries;
mod routing;
