//! removebgd: on-device background removal. See README.md for the architecture.
pub mod app;
pub mod clock;
pub mod commands;
pub mod config;
pub mod digest;
pub mod engine;
pub mod fetch;
pub mod http;
pub mod jobs;
pub mod memory;
pub mod metrics;
pub mod mqtt;
pub mod ops;
pub mod provision;
pub mod store;
pub mod systemd;
pub mod telemetry;
