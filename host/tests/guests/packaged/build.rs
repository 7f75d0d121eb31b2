//! Builds and packages the first-party handlers the binary does not embed
//! and the test guests, beside the embedded ones (`env!("OTABOX_BUILT_HANDLERS")`).

#[path = "../../../build/guests.rs"]
mod guests;

use std::path::PathBuf;

/// (cargo package, handler name, manifest in the source tree)
const GUESTS: &[guests::Guest] = &[
    ("otabox-handler-apt", "apt", "handlers/apt/apt.toml"),
    (
        "otabox-handler-container",
        "container",
        "handlers/container/container.toml",
    ),
    (
        "otabox-handler-firmware",
        "firmware",
        "handlers/firmware/firmware.toml",
    ),
    (
        "otabox-test-hostile",
        "hostile",
        "host/tests/guests/hostile/hostile.toml",
    ),
    (
        "otabox-test-hostile-devices",
        "hostile-devices",
        "host/tests/guests/hostile-devices/hostile-devices.toml",
    ),
    (
        "otabox-test-contract-1-0",
        "contract-1-0",
        "host/tests/guests/contract-1-0/contract-1-0.toml",
    ),
];

/// Source paths (relative to the workspace) of [`GUESTS`].
const SOURCES: &[&str] = &[
    "handlers/apt",
    "handlers/container",
    "handlers/firmware",
    "host/tests/guests/hostile",
    "host/tests/guests/hostile-devices",
    "host/tests/guests/contract-1-0",
];

fn main() {
    let manifest_dir =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let workspace = manifest_dir
        .ancestors()
        .nth(4)
        .expect("host/tests/guests/packaged is four levels below the workspace");
    guests::build_and_package(workspace, GUESTS, SOURCES);
}
