//! Helpers shared by the integration tests: real servers on loopback, waits with deadlines.
#![allow(dead_code)]

pub mod exporter;
pub mod prometheus;
pub mod promql;
pub mod prosody;
pub mod proxy;
pub mod wait;
pub mod world;
