//! Records the target triple this crate is built for: the engine's own
//! target when it runs native code (see `engine::EngineTarget::this_host`).

fn main() {
    let target = std::env::var("TARGET").unwrap_or_else(|_| "unknown".into());
    println!("cargo:rustc-env=OTABOX_BUILD_TARGET={target}");
    println!("cargo:rerun-if-env-changed=TARGET");
}
