//! removebgd: on-device background removal. See README.md for the architecture.
pub mod app;
pub mod commands;
pub mod config;
pub mod engine;
pub mod provision;
pub mod telemetry;
