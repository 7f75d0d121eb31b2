//! Nothing to link: the build script of this crate builds the handlers and
//! test guests that `otabox`'s tests and benchmarks load from
//! `otabox::builtin::BUILT_DIR`. Being a dev-dependency of `otabox`, it is
//! built with the tests and benchmarks, never by `cargo run -p otabox`.
