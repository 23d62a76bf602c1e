//! End-to-end "zero failed requests" suite: lameduck behind a real HAProxy
//! (rolling termination, soak), scraped by a real Prometheus, and faults.
//!
//! Needs `haproxy` and `prometheus`/`promtool` on the machine; a missing tool
//! fails the test with a message (the suite never skips silently).
//! Tests serialise themselves (see `support::run_test`).

mod faults;
mod haproxy;
mod load;
#[path = "../support/pki.rs"]
mod pki;
mod prometheus;
mod rolling;
mod soak;
mod support;
