//! Nothing to link: the build script of this crate builds the handlers and
//! test guests that `otabox`'s tests and benchmarks load from
//! `env!("OTABOX_BUILT_HANDLERS")`. Being a dev-dependency of `otabox`, it is
//! built with the tests and benchmarks, never by `cargo run -p otabox`.
