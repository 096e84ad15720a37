//! The command-line front-ends: each subcommand's behaviour, on top of `app` and the engine.

pub mod admin;
pub mod bench;
pub mod calibrate;
pub mod cut;
pub mod models;
