//! The `otabox/apt:1` handler (alias `microsoft/apt:1`), in progress.
//!
//! This crate holds the rules the handler will run on: the strict apt
//! manifest of Device Update ([`manifest`]) and Debian version syntax and
//! ordering ([`version`]). The lifecycle (apt-get through the exec
//! capability, backup and rollback, a configurable apt root) comes next.

pub mod manifest;
pub mod version;
