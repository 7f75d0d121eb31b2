//! The process capability: `[[commands]]` rules naming the programs a
//! handler may run, with which arguments, variables, user and Linux
//! capabilities (`rules`, `identity`); narrowed by the device's
//! `commands` and `allow_args`; linked as `otabox:handler/process`
//! ([`host`]), each command contained and de-privileged ([`confine`]).

pub mod confine;
pub mod host;
mod identity;
mod rules;

use anyhow::{Context, Result, bail};
use wasmtime::component::{HasSelf, Linker};

use super::{Capability, CapabilityUnit, DeviceGrant, Grants, HandlerManifest};
use crate::HostState;
use crate::bindings::otabox::handler::process;

pub use identity::{CapSet, RunAs};
pub use rules::{ArgPattern, CommandRule, Denial, authorize};

/// The process capability.
pub struct Process;

impl CapabilityUnit for Process {
    fn kind(&self) -> Capability {
        Capability::Process
    }

    fn owns_import(&self, _package: &str, interface: &str) -> bool {
        interface == "otabox:handler/process"
    }

    fn noun(&self) -> &'static str {
        "command rules"
    }

    fn summary_key(&self) -> &'static str {
        "commands"
    }

    fn check_manifest(&self, manifest: &HandlerManifest) -> Result<()> {
        for (i, rule) in manifest.commands.iter().enumerate() {
            rule.check()
                .with_context(|| format!("field `commands[{i}]`"))?;
        }
        Ok(())
    }

    fn declared(&self, manifest: &HandlerManifest) -> bool {
        !manifest.commands.is_empty()
    }

    fn narrow(
        &self,
        manifest: &HandlerManifest,
        device: &DeviceGrant,
        grants: &mut Grants,
    ) -> Result<()> {
        grants.commands = narrow_commands(manifest, device)?;
        Ok(())
    }

    fn granted(&self, grants: &Grants) -> bool {
        !grants.commands.is_empty()
    }

    /// `program pattern… [env: …] [deny: …] [as whom]` per rule.
    fn summarize(&self, grants: &Grants) -> Vec<String> {
        grants
            .commands
            .iter()
            .map(|c| {
                let mut line = command_line(c);
                if !c.env.is_empty() {
                    line.push_str(&format!(" [env: {}]", c.env.join(", ")));
                }
                if !c.deny_args.is_empty() {
                    line.push_str(&format!(" [deny: {}]", c.deny_args.join(", ")));
                }
                line.push_str(&format!(" [{}]", runs_as(c)));
                line
            })
            .collect()
    }

    fn add_to_linker(&self, l: &mut Linker<HostState>) -> Result<()> {
        process::add_to_linker::<HostState, HasSelf<HostState>>(l, |s| s)?;
        Ok(())
    }
}

/// `program pattern…` of a rule.
pub fn command_line(rule: &CommandRule) -> String {
    std::iter::once(rule.program.as_str())
        .chain(rule.args.iter().map(String::as_str))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Who a rule's program runs as, in words.
pub fn runs_as(rule: &CommandRule) -> String {
    let user = rule.user.as_deref().unwrap_or("the agent's user");
    let caps = match rule.keeps() {
        CapSet::ALL => "all capabilities".to_string(),
        c if c.is_empty() => "no capabilities".to_string(),
        _ => format!("capabilities {}", rule.capabilities.join(", ")),
    };
    let stays = if rule.keep_running {
        ", leaves processes running"
    } else {
        ""
    };
    format!("as {user}, {caps}, no_new_privs{stays}")
}

/// The declared rules of the programs the device keeps, as granted there.
fn narrow_commands(manifest: &HandlerManifest, device: &DeviceGrant) -> Result<Vec<CommandRule>> {
    let declared = |program: &String| manifest.commands.iter().any(|r| &r.program == program);
    for program in device
        .commands
        .iter()
        .flatten()
        .chain(device.allow_args.keys())
    {
        if !declared(program) {
            bail!(
                "device config lists program {program:?} (`commands`/`allow_args`), which the handler does not declare"
            );
        }
    }
    let mut granted = Vec::new();
    for rule in &manifest.commands {
        let kept = device
            .commands
            .as_ref()
            .is_none_or(|allowed| allowed.contains(&rule.program));
        if !kept {
            continue;
        }
        let allowed: Vec<String> = device
            .allow_args
            .get(&rule.program)
            .into_iter()
            .flatten()
            .filter(|lift| rule.deny_args.contains(lift))
            .cloned()
            .collect();
        if let Some(rule) = rule.for_device(device.config.as_ref(), &allowed)? {
            granted.push(rule);
        }
    }
    for (program, lifts) in &device.allow_args {
        for lift in lifts {
            let denied = manifest
                .commands
                .iter()
                .any(|r| &r.program == program && r.deny_args.contains(lift));
            if !denied {
                bail!(
                    "device config `allow_args` lifts {lift:?} for {program:?}, which none of its rules denies"
                );
            }
        }
    }
    Ok(granted)
}
