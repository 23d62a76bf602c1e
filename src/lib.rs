//! lameduck: a sidecar proxy that drains without dropping a request.
//!
//! `main.rs` parses the command line and calls [`lifecycle::run`]; everything
//! else lives here so tests and benchmarks can use it.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod admin;
pub mod config;
pub mod demo;
pub mod drain;
pub mod drain_client;
pub mod inject;
pub mod kube;
pub mod lifecycle;
pub mod metrics;
pub mod observe;
pub mod proxy;
pub mod telemetry;
pub mod tls;
