//! `otabox handlers install` and `remove`: an integrator's handler placed
//! into, or taken out of, the last handler directory
//! (`otabox::runtime::placement`), then the running agent told to reload.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use otabox::audit::{HandlerAudit, Severity, audit_handler, render_text};
use otabox::config::DeviceConfig;
use otabox::local::Owner;
use otabox::runtime::Runtime;
use otabox::runtime::placement::{self, Candidate};
use otabox::{out, outln};

/// Installs `wasm` + `toml` into the integrator's directory of `config`.
pub async fn install(
    config: &DeviceConfig,
    wasm: &Path,
    toml: &Path,
    force: bool,
) -> Result<ExitCode> {
    let dirs = config.paths.handlers.as_slice();
    let target = config.paths.handlers.integrator();
    placement::check_target(target)?;
    let candidate = Candidate::read(wasm, toml)?;
    placement::check_conflicts(dirs, target, &config.handlers, &candidate)?;
    let runtime = Runtime::new(Some(config.cache_dir()))?;
    let audit = audit_candidate(&runtime, config, &candidate, target).await?;
    out!("{}", render_text(std::slice::from_ref(&audit)))?;
    let errors = audit.count(Severity::Error);
    if errors > 0 && !force {
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            format!(
                "refused: the audit of handler {} found {errors} error(s) (above); nothing was installed (--force installs it anyway)\n",
                candidate.name
            )
            .as_bytes(),
        );
        return Ok(ExitCode::FAILURE);
    }
    placement::place(dirs, target, &config.handlers, &candidate)?;
    outln!(
        "installed handler {} into {} (sha256 {}, update types {}){}",
        candidate.name,
        target.display(),
        candidate.sha256,
        audit
            .update_types
            .iter()
            .map(|t| t.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        match &candidate.artifact {
            Some(a) => format!(", with its precompiled artifact for {}", a.record.target),
            None => String::new(),
        }
    )?;
    tell_agent(config)?;
    Ok(ExitCode::SUCCESS)
}

/// Audits `candidate` against the device's grants from a private scratch
/// copy (which also precompiles it into the cache); the audit names the
/// files it will have in `target`.
async fn audit_candidate(
    runtime: &Runtime,
    config: &DeviceConfig,
    candidate: &Candidate,
    target: &Path,
) -> Result<HandlerAudit> {
    let scratch = tempfile::Builder::new()
        .prefix("otabox-install-")
        .tempdir()
        .context("cannot create a scratch directory for the audit")?;
    let staged = candidate.stage(scratch.path())?;
    let mut audit = audit_handler(runtime, &staged, &config.handlers).await;
    audit.manifest = target.join(format!("{}.toml", candidate.name));
    audit.wasm = audit.manifest.with_extension("wasm");
    Ok(audit)
}

/// Removes the integrator's handler `name` and its cache entry.
pub fn remove(config: &DeviceConfig, name: &str) -> Result<ExitCode> {
    let dirs = config.paths.handlers.as_slice();
    let removed = placement::remove(dirs, config.paths.handlers.integrator(), name)?;
    if let Some(sha256) = &removed.sha256 {
        drop_cache_entry(config, sha256)?;
    }
    outln!("removed handler {name} ({})", removed.manifest.display())?;
    if config.handlers.contains_key(name) {
        outln!(
            "note: the device config still has `[handlers.{name}]`, which now names no handler"
        )?;
    }
    tell_agent(config)?;
    Ok(ExitCode::SUCCESS)
}

/// Deletes the precompiled component of `sha256`, unless another handler
/// of the directories still has that component.
fn drop_cache_entry(config: &DeviceConfig, sha256: &str) -> Result<()> {
    let dirs = config.paths.handlers.as_slice();
    let still_used = otabox::runtime::dirs::discover(dirs, &config.handlers)?
        .iter()
        .any(|f| {
            otabox::capabilities::HandlerManifest::load(&f.manifest)
                .is_ok_and(|m| m.handler.sha256 == sha256)
        });
    if still_used {
        return Ok(());
    }
    let runtime = Runtime::new(Some(config.cache_dir()))?;
    if let Some(entry) = runtime.cache().entry(runtime.engine(), sha256) {
        match std::fs::remove_file(&entry) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("cannot remove {}", entry.display()));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Sends SIGHUP to the agent running on the config's state directory, if
/// one does: it reloads its handlers between jobs.
fn tell_agent(config: &DeviceConfig) -> Result<()> {
    let owner = otabox::local::owner(&config.paths.state).unwrap_or(Owner::Nobody);
    match owner {
        Owner::Agent { pid: Some(pid) } => {
            let pid = libc::pid_t::try_from(pid).context("agent pid out of range")?;
            // SAFETY: kill has no memory effects; the pid is the one the
            // agent holding the state lock wrote.
            if unsafe { libc::kill(pid, libc::SIGHUP) } == 0 {
                outln!("the running agent (pid {pid}) reloads its handlers between jobs")?;
                return Ok(());
            }
            outln!(
                "could not signal the agent (pid {pid}): {}; reload it with SIGHUP",
                std::io::Error::last_os_error()
            )?;
        }
        _ => outln!(
            "a running agent loads the change on SIGHUP (`systemctl reload otabox`), between jobs"
        )?,
    }
    Ok(())
}
