//! `otabox handlers audit`: per handler, what it declares, what the device
//! grants, what the component really imports, and every mismatch.
//!
//! An import with no matching declaration or grant is an error; a
//! declaration nothing uses is a warning. Risky grants (a shell with open
//! arguments, a system directory granted read-write, a root-equivalent
//! program) are warnings that `--strict` or `--deny ID` turn into errors.
//! Every finding carries a stable id (`docs/audit.md`). Any error makes the
//! command exit non-zero, so it can gate a release.

mod risks;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::Serialize;

use crate::capabilities::{
    self, Access, Capability, DeviceGrant, Grants, HandlerManifest, ImportCheck, ImportFault,
    check_imports,
};
use crate::{Runtime, handler_name};
use otabox_core::update_type::UpdateType;

/// How serious a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The handler must not ship or load like this.
    Error,
    /// Worth a look; does not block.
    Warning,
}

/// One mismatch or problem.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// Its stable id (`docs/audit.md`), such as `shell-wildcard`.
    pub id: &'static str,
    /// Error or warning.
    pub severity: Severity,
    /// Whether it is a risk of the grants (which `--strict` makes an error)
    /// rather than a mismatch.
    pub risk: bool,
    /// What is wrong.
    pub message: String,
}

/// What a grant really gives.
#[derive(Debug, Clone, Serialize)]
pub struct GrantEffect {
    /// The grant, as in the summary (`program pattern…`, `rw /path`).
    pub grant: String,
    /// Its effective privilege.
    pub effect: risks::Effect,
    /// Why, and as whom a command runs.
    pub why: String,
}

/// Which findings are errors beyond those that always are.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Every risk finding is an error.
    pub strict: bool,
    /// Finding ids that are errors.
    pub deny: Vec<String>,
}

impl Policy {
    /// Raises the findings this policy denies to errors.
    pub fn apply(&self, audits: &mut [HandlerAudit]) {
        for finding in audits.iter_mut().flat_map(|a| a.findings.iter_mut()) {
            if (self.strict && finding.risk) || self.deny.iter().any(|d| d == finding.id) {
                finding.severity = Severity::Error;
            }
        }
    }
}

/// A summary of capabilities, declared or granted.
#[derive(Debug, Clone, Serialize)]
pub struct CapabilitySummary {
    /// Per capability (its summary key: `filesystem`, `commands`,
    /// `network`, `devices`), one line per grant, as
    /// [`crate::capabilities::CapabilityUnit::summarize`] writes them.
    #[serde(flatten)]
    pub capabilities: BTreeMap<&'static str, Vec<String>>,
    /// Memory cap in MiB.
    pub memory_mb: u64,
    /// Time limit per call in ms.
    pub call_timeout_ms: u64,
    /// Capabilities linked to stubs that refuse every call.
    pub stubbed: Vec<String>,
}

/// An import of the component and the capability it needs.
#[derive(Debug, Clone, Serialize)]
pub struct ImportAudit {
    /// Interface name, such as `wasi:filesystem/types@0.2.4`.
    pub name: String,
    /// The capability it belongs to.
    pub capability: Capability,
    /// Linked to a stub that refuses every call (`[stubs] refuse`).
    pub stubbed: bool,
}

/// The audit of one handler.
#[derive(Debug, Clone, Serialize)]
pub struct HandlerAudit {
    /// Handler name.
    pub name: String,
    /// Manifest file.
    pub manifest: PathBuf,
    /// Component file.
    pub wasm: PathBuf,
    /// sha256 of the component file, when readable.
    pub sha256: Option<String>,
    /// Whether the device enables it.
    pub enabled: bool,
    /// Declared update types.
    pub update_types: Vec<UpdateType>,
    /// Declared capabilities.
    pub declared: Option<CapabilitySummary>,
    /// Capabilities granted on this device.
    pub granted: Option<CapabilitySummary>,
    /// The contract version the component was built against.
    pub contract: Option<String>,
    /// The component's real imports.
    pub imports: Vec<ImportAudit>,
    /// What each granted command and directory really gives.
    pub effective: Vec<GrantEffect>,
    /// Mismatches and problems.
    pub findings: Vec<Finding>,
}

impl HandlerAudit {
    /// Number of findings of `severity`.
    pub fn count(&self, severity: Severity) -> usize {
        self.findings
            .iter()
            .filter(|f| f.severity == severity)
            .count()
    }

    fn error(&mut self, id: &'static str, message: impl Into<String>) {
        self.push(id, Severity::Error, false, message.into());
    }

    fn warning(&mut self, id: &'static str, message: impl Into<String>) {
        self.push(id, Severity::Warning, false, message.into());
    }

    fn risk(&mut self, id: &'static str, message: String) {
        self.push(id, Severity::Warning, true, message);
    }

    fn push(&mut self, id: &'static str, severity: Severity, risk: bool, message: String) {
        self.findings.push(Finding {
            id,
            severity,
            risk,
            message,
        });
    }
}

/// Audits every handler of `dirs` (the list [`crate::Runtime::load_dirs`]
/// loads) against the device's grants. `runtime` compiles components
/// (through its cache) and test-loads clean handlers. A second claim of a
/// name or an update type is an error naming both files.
pub async fn audit_dirs(
    runtime: &Runtime,
    dirs: &[PathBuf],
    device: &BTreeMap<String, DeviceGrant>,
) -> Result<Vec<HandlerAudit>> {
    let mut audits = Vec::new();
    let files = {
        let _locks = crate::dirs::DirLock::shared_all(dirs)?;
        crate::dirs::discover(dirs, device)?
    };
    let manifests: Vec<PathBuf> = files.iter().map(|f| f.manifest.clone()).collect();
    let last = dirs.last().map_or(Path::new("."), PathBuf::as_path);
    for unknown in crate::unknown_handlers(device, &manifests) {
        audits.push(unknown_handler(last, &unknown));
    }
    for file in files {
        let mut audit = audit_handler(runtime, &file.manifest, device).await;
        if let Some(conflict) = file.conflict {
            audit.error(conflict.id, conflict.message);
        }
        audits.push(audit);
    }
    Ok(audits)
}

/// The audit entry of a `[handlers.NAME]` that names no handler: an error
/// (a typo leaves the meant handler without its grants and config).
fn unknown_handler(dir: &Path, unknown: &crate::UnknownHandler) -> HandlerAudit {
    let manifest = dir.join(format!("{}.toml", unknown.name));
    let mut audit = HandlerAudit {
        name: unknown.name.clone(),
        wasm: manifest.with_extension("wasm"),
        manifest,
        sha256: None,
        enabled: true,
        update_types: Vec::new(),
        declared: None,
        granted: None,
        contract: None,
        imports: Vec::new(),
        effective: Vec::new(),
        findings: Vec::new(),
    };
    audit.error("unknown-handler", unknown.to_string());
    audit
}

/// Audits the handler of `manifest_path` (and the `.wasm` beside it)
/// against the device's grants, alone: [`audit_dirs`] adds the conflicts
/// with the other handlers.
pub async fn audit_handler(
    runtime: &Runtime,
    manifest_path: &Path,
    device: &BTreeMap<String, DeviceGrant>,
) -> HandlerAudit {
    let name = handler_name(manifest_path).unwrap_or_else(|_| manifest_path.display().to_string());
    let grant = device.get(&name);
    let mut audit = HandlerAudit {
        name,
        manifest: manifest_path.to_path_buf(),
        wasm: manifest_path.with_extension("wasm"),
        sha256: None,
        enabled: grant.is_none_or(|g| g.enabled),
        update_types: Vec::new(),
        declared: None,
        granted: None,
        contract: None,
        imports: Vec::new(),
        effective: Vec::new(),
        findings: Vec::new(),
    };
    if let Err(e) = handler_name(manifest_path) {
        audit.error("bad-name", format!("{e:#}"));
    }
    let manifest = match HandlerManifest::load(manifest_path) {
        Ok(m) => m,
        Err(e) => {
            audit.error("manifest-invalid", format!("{e:#}"));
            return audit;
        }
    };
    audit.update_types = manifest.handler.update_types.clone();
    audit.declared = Grants::narrow(&manifest, None).ok().as_ref().map(summarize);
    let grants = match Grants::narrow(&manifest, grant) {
        Ok(grants) => grants,
        Err(e) => {
            audit.error("grant-refused", format!("{e:#}"));
            return audit;
        }
    };
    audit.granted = Some(summarize(&grants));
    assess(&mut audit, &grants);
    let wasm = match std::fs::read(&audit.wasm) {
        Ok(bytes) => bytes,
        Err(e) => {
            audit.error(
                "wasm-unreadable",
                format!("cannot read {}: {e}", audit.wasm.display()),
            );
            return audit;
        }
    };
    let sha256 = match manifest.check_pin(&wasm) {
        Ok(sha256) => sha256,
        Err(m) => {
            audit.error(
                "sha256-mismatch",
                format!(
                    "sha256 of the wasm is {}, but the manifest pins {}",
                    m.actual, m.pinned
                ),
            );
            m.actual
        }
    };
    audit.sha256 = Some(sha256.clone());
    let component = match runtime
        .cache()
        .load(runtime.engine(), &wasm, &sha256, &audit.wasm)
    {
        Ok((component, _)) => component,
        Err(e) => {
            audit.error("compile-failed", format!("{e:#}"));
            return audit;
        }
    };
    let ty = component.component_type();
    let checks = check_imports(
        ty.imports(runtime.engine()).map(|(i, _)| i),
        &manifest,
        &grants,
    );
    audit.contract = crate::contract_version(runtime.engine(), &component);
    if audit.contract.is_none() {
        audit.error(
            "no-handler-export",
            "does not export `otabox:handler/handler@1.x`",
        );
    }
    compare(&mut audit, &manifest, &checks);
    devices_in_writable_paths(&mut audit, &grants, grant);
    if audit.count(Severity::Error) == 0
        && audit.enabled
        && let Err(e) = runtime.load_handler(manifest_path, grant).await
    {
        if e.downcast_ref::<crate::InvalidConfig>().is_some() {
            audit.error("invalid-config", format!("{e:#}"));
        } else {
            audit.error("load-failed", format!("load: {e:#}"));
        }
    }
    audit
}

/// Records the imports, every one without a declaration or grant (error)
/// and every declaration or stub without an import (warning).
fn compare(audit: &mut HandlerAudit, manifest: &HandlerManifest, checks: &[ImportCheck]) {
    audit.imports = checks
        .iter()
        .map(|c| ImportAudit {
            name: c.name.clone(),
            capability: c.capability,
            stubbed: c.stubbed,
        })
        .collect();
    let used = |cap: Capability| checks.iter().any(|i| i.capability == cap);
    let noun = |cap: Capability| capabilities::unit(cap).map_or("", |u| u.noun());
    let mut warnings = Vec::new();
    for check in checks {
        let (import, what) = (&check.name, noun(check.capability));
        match check.fault {
            Some(ImportFault::Undeclared) => audit.error(
                "undeclared-import",
                format!("imports `{import}` but declares no {what}"),
            ),
            Some(ImportFault::Ungranted) => audit.error(
                "ungranted-import",
                format!("imports `{import}` but the device grants none of its {what}"),
            ),
            Some(ImportFault::Unsupported) => audit.error(
                "unsupported-import",
                format!("imports `{import}`, which otabox does not provide"),
            ),
            None => {}
        }
    }
    for unit in capabilities::ALL {
        let cap = unit.kind();
        if manifest.declares(cap) && !used(cap) {
            warnings.push((
                "unused-declaration",
                format!(
                    "declares {} but imports no {} interface",
                    unit.noun(),
                    cap.label()
                ),
            ));
        }
    }
    for &cap in &manifest.stubs.refuse {
        if !used(cap) {
            let what = cap.label();
            warnings.push((
                "unused-stub",
                format!("stubs {what} but imports no {what} interface"),
            ));
        }
    }
    warnings
        .into_iter()
        .for_each(|(id, w)| audit.warning(id, w));
}

/// Records what each granted command and read-write directory really
/// gives, and a risk finding for each dangerous one.
fn assess(audit: &mut HandlerAudit, grants: &Grants) {
    for rule in &grants.commands {
        let line = capabilities::process::command_line(rule);
        let as_whom = risks::runs_as(rule);
        let Some((effect, why)) = risks::command_effect(rule) else {
            continue;
        };
        if let Some(id) = effect.finding() {
            audit.risk(id, format!("`{line}` is {}: {why}", effect.label()));
        }
        audit.effective.push(GrantEffect {
            grant: line,
            effect,
            why: format!("{why}; runs {as_whom}"),
        });
    }
    for path in grants
        .paths
        .iter()
        .filter(|p| p.access == Access::ReadWrite)
    {
        if risks::is_system_path(&path.host) || risks::is_system_path(&path.guest) {
            let grant = format!("rw {}", path.host.display());
            audit.risk(
                "system-path-rw",
                format!("`{grant}` lets the handler change the system's own files"),
            );
            audit.effective.push(GrantEffect {
                grant,
                effect: risks::Effect::WritesAnywhere,
                why: "a system directory, writable".into(),
            });
        }
    }
}

/// A device inside a directory the handler may write is an error, unless
/// the device config allows it (`devices_in_writable_paths`): a warning.
fn devices_in_writable_paths(
    audit: &mut HandlerAudit,
    grants: &Grants,
    device: Option<&DeviceGrant>,
) {
    for found in crate::capabilities::devices_in_writable_paths(grants, device) {
        let message = format!(
            "device {} ({}) lies inside {}, which the handler may write: it could put a link or another file in the device's place{}",
            found.device.display(),
            found.host.display(),
            found.writable.display(),
            if found.allowed {
                " (allowed by `devices_in_writable_paths`)"
            } else {
                "; move it, or list it in `devices_in_writable_paths` of the device config"
            }
        );
        if found.allowed {
            audit.warning("device-in-writable-path", message);
        } else {
            audit.error("device-in-writable-path", message);
        }
    }
}

fn summarize(grants: &Grants) -> CapabilitySummary {
    CapabilitySummary {
        capabilities: capabilities::ALL
            .iter()
            .map(|u| (u.summary_key(), u.summarize(grants)))
            .collect(),
        memory_mb: grants.limits.memory_mb,
        call_timeout_ms: grants.limits.call_timeout_ms,
        stubbed: grants
            .stubbed
            .iter()
            .map(|c| c.label().to_string())
            .collect(),
    }
}

/// Renders audits for a terminal.
pub fn render_text(audits: &[HandlerAudit]) -> String {
    let mut out = String::new();
    for a in audits {
        let (errors, warnings) = (a.count(Severity::Error), a.count(Severity::Warning));
        let verdict = match (errors, warnings) {
            (0, 0) => "ok".to_string(),
            _ => format!("{errors} error(s), {warnings} warning(s)"),
        };
        let _ = writeln!(
            out,
            "handler {}: {verdict}{}",
            a.name,
            if a.enabled {
                ""
            } else {
                " (disabled by device config)"
            }
        );
        let _ = writeln!(out, "  manifest  {}", a.manifest.display());
        let _ = writeln!(out, "  wasm      {}", a.wasm.display());
        let _ = writeln!(out, "  sha256    {}", a.sha256.as_deref().unwrap_or("-"));
        let _ = writeln!(out, "  types     {}", a.update_types.join(", "));
        let _ = writeln!(out, "  contract  {}", a.contract.as_deref().unwrap_or("-"));
        for (label, caps) in [("declared", &a.declared), ("granted", &a.granted)] {
            if let Some(c) = caps {
                for (i, unit) in capabilities::ALL.iter().enumerate() {
                    let key = unit.summary_key();
                    let lines = c.capabilities.get(key).map_or(&[][..], Vec::as_slice);
                    let head = if i == 0 { label } else { "" };
                    let _ = writeln!(
                        out,
                        "  {head:<9} {:<11} {}",
                        format!("{key}:"),
                        list_or_none(lines)
                    );
                }
                let _ = writeln!(
                    out,
                    "            limits:     {} MiB, {} ms per call",
                    c.memory_mb, c.call_timeout_ms
                );
                if !c.stubbed.is_empty() {
                    let _ = writeln!(
                        out,
                        "            stubbed:    {} (linked, every call refused)",
                        c.stubbed.join(", ")
                    );
                }
            }
        }
        let _ = writeln!(
            out,
            "  imports   {}",
            if a.imports.is_empty() { "-" } else { "" }
        );
        for i in &a.imports {
            let stub = if i.stubbed { " (stub: refused)" } else { "" };
            let _ = writeln!(out, "    {:<44} {}{stub}", i.name, i.capability.label());
        }
        for e in &a.effective {
            let _ = writeln!(
                out,
                "  effective {}: {} ({})",
                e.grant,
                e.effect.label(),
                e.why
            );
        }
        for f in &a.findings {
            let tag = if f.severity == Severity::Error {
                "error"
            } else {
                "warning"
            };
            let _ = writeln!(out, "  {tag}: {} [{}]", f.message, f.id);
        }
        out.push('\n');
    }
    let errors: usize = audits.iter().map(|a| a.count(Severity::Error)).sum();
    let warnings: usize = audits.iter().map(|a| a.count(Severity::Warning)).sum();
    let _ = writeln!(
        out,
        "{} handler(s), {errors} error(s), {warnings} warning(s)",
        audits.len()
    );
    out
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "none".into()
    } else {
        items.join("; ")
    }
}
