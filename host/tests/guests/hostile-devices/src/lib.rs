//! A test guest that attacks the `devices` capability, as a vendor could
//! from the WIT alone: through its writable directory grant it replaces a
//! declared slot file with a relative symbolic link (`plant`) or renames
//! another file over it (`replace`), then asks the host for `info`, `hash` (of `length`
//! bytes) or `write` (the payload `payload`) on `path`. Results come back
//! as `skipped(text)`, host errors as `failed` with the error text.

use otabox_sdk::devices;
use otabox_sdk::prelude::*;
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
enum Action {
    Plant { path: String, target: String },
    Replace { path: String },
    Info { path: String },
    Hash { path: String, length: u64 },
    Write { path: String, payload: String },
}

struct HostileDevices;

impl Handler for HostileDevices {
    type Manifest = ();
    type Config = ();

    fn describe() -> Description {
        Description::new(
            "hostile-devices",
            "0.0.0",
            ["otabox-test/hostile-devices:1"],
        )
    }

    fn validate(_job: &Job<Self>) -> Result<Plan, Status> {
        Ok(Plan::new("hostile-devices-0"))
    }

    fn install(job: &Job<Self>) -> Result<Outcome, Status> {
        Ok(match job.step.manifest::<Action>() {
            Ok(action) => act(&job.step, action),
            Err(status) => Outcome::Failed(status),
        })
    }
}

fn act(step: &Step, action: Action) -> Outcome {
    match action {
        Action::Plant { path, target } => report(
            std::fs::remove_file(&path)
                .and_then(|()| symlink(&target, &path))
                .map(|()| format!("{path} -> {target}"))
                .map_err(|e| e.to_string()),
        ),
        Action::Replace { path } => report(
            std::fs::write(format!("{path}.new"), vec![0u8; 8192])
                .and_then(|()| std::fs::rename(format!("{path}.new"), &path))
                .map(|()| "replaced".to_string())
                .map_err(|e| e.to_string()),
        ),
        Action::Info { path } => report(
            devices::info(&path)
                .map(|i| format!("size={} block={}", i.size, i.block))
                .map_err(|e| format!("{e:?}")),
        ),
        Action::Hash { path, length } => {
            report(devices::hash(&path, length).map_err(|e| format!("{e:?}")))
        }
        Action::Write { path, payload } => match step.open_payload(&payload) {
            Ok(image) => report(devices::write_image(&path, &image).map_err(|e| format!("{e:?}"))),
            Err(status) => Outcome::Failed(status),
        },
    }
}

unsafe extern "C" {
    /// wasi-libc's POSIX `symlink`, resolved through the preopens like any
    /// path (std's wrapper is unstable).
    #[link_name = "symlink"]
    fn libc_symlink(target: *const std::ffi::c_char, link: *const std::ffi::c_char) -> i32;
}

/// Creates the symbolic link `link` pointing at `target`.
fn symlink(target: &str, link: &str) -> std::io::Result<()> {
    let invalid = |_| std::io::Error::from(std::io::ErrorKind::InvalidInput);
    let (target, link) = (
        std::ffi::CString::new(target).map_err(invalid)?,
        std::ffi::CString::new(link).map_err(invalid)?,
    );
    // SAFETY: both are NUL-terminated strings that outlive the call.
    match unsafe { libc_symlink(target.as_ptr(), link.as_ptr()) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

fn report(result: Result<String, String>) -> Outcome {
    match result {
        Ok(text) => Outcome::Skipped(text),
        Err(e) => Outcome::Failed(Status::new(99, e)),
    }
}

export_handler!(HostileDevices);
