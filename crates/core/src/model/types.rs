//! The values exchanged with a handler, mirroring the `otabox:handler` WIT
//! types field for field (the runtime converts at its edge), and the
//! result of a step as reported.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A lifecycle call of a handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// What the handler is.
    Describe,
    /// Plan the step (installed criteria, payloads).
    Validate,
    /// Whether the step's criteria already hold.
    IsInstalled,
    /// Work on the fetched payloads.
    Download,
    /// Record what install changes.
    Backup,
    /// Change the system.
    Install,
    /// Activate the change.
    Apply,
    /// Check the change works.
    Verify,
    /// Make it permanent.
    Commit,
    /// Restore what backup recorded.
    Rollback,
    /// Remove the step's scratch files.
    Cleanup,
    /// List what the handler manages.
    Inventory,
}

impl Phase {
    /// Every phase, in lifecycle order.
    pub const ALL: [Phase; 12] = [
        Phase::Describe,
        Phase::Validate,
        Phase::IsInstalled,
        Phase::Download,
        Phase::Backup,
        Phase::Install,
        Phase::Apply,
        Phase::Verify,
        Phase::Commit,
        Phase::Rollback,
        Phase::Cleanup,
        Phase::Inventory,
    ];

    /// The WIT name (`is-installed`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Describe => "describe",
            Phase::Validate => "validate",
            Phase::IsInstalled => "is-installed",
            Phase::Download => "download",
            Phase::Backup => "backup",
            Phase::Install => "install",
            Phase::Apply => "apply",
            Phase::Verify => "verify",
            Phase::Commit => "commit",
            Phase::Rollback => "rollback",
            Phase::Cleanup => "cleanup",
            Phase::Inventory => "inventory",
        }
    }

    /// Whether the phase may change the system, so the journal records it
    /// before the call (a crash in it makes the agent ask the handler).
    pub fn changes_system(self) -> bool {
        matches!(
            self,
            Phase::Backup
                | Phase::Install
                | Phase::Apply
                | Phase::Verify
                | Phase::Commit
                | Phase::Rollback
        )
    }

    /// Whether a failure in this phase leaves the system as it was.
    pub fn leaves_system_untouched(self) -> bool {
        matches!(
            self,
            Phase::Validate | Phase::IsInstalled | Phase::Download | Phase::Backup
        )
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<str> for Phase {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

/// A phase name that names no phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownPhase(pub String);

impl fmt::Display for UnknownPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown phase {:?}", self.0)
    }
}

impl std::error::Error for UnknownPhase {}

impl FromStr for Phase {
    type Err = UnknownPhase;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Phase::ALL
            .into_iter()
            .find(|p| p.as_str() == name)
            .ok_or_else(|| UnknownPhase(name.into()))
    }
}

/// When a reboot a phase asks for happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RebootMode {
    /// Now, run by the agent.
    Immediate,
    /// Whenever the device next reboots.
    Deferred,
}

/// A structured error code: `facility` (0 is the host), `component`,
/// `value`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExtendedCode {
    /// Who detected the failure (0: the host).
    pub facility: u8,
    /// The part of it.
    pub component: u8,
    /// The failure.
    pub value: u32,
}

impl ExtendedCode {
    /// Packs the code as `facility << 28 | component << 20 | value`.
    pub fn pack(&self) -> u32 {
        (u32::from(self.facility & 0xF) << 28)
            | (u32::from(self.component) << 20)
            | (self.value & 0xF_FFFF)
    }
}

/// Packs an extended code into 32 bits (see [`ExtendedCode::pack`]).
pub fn pack(code: &ExtendedCode) -> u32 {
    code.pack()
}

/// A failure as a handler (or the host) reports it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Status {
    /// Result code.
    pub result_code: u32,
    /// Extended code.
    pub extended_code: ExtendedCode,
    /// Message for people.
    pub message: String,
    /// Key-value details.
    pub details: Vec<(String, String)>,
}

/// What a phase returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Done.
    Success,
    /// Nothing to do, and why.
    Skipped(String),
    /// Done; takes effect after a reboot.
    RebootRequired(RebootMode),
    /// Done; takes effect after the agent restarts.
    RestartAgent,
    /// Failed.
    Failed(Status),
    /// Stopped on a cancel request.
    Cancelled,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Success => f.write_str("success"),
            Outcome::Skipped(why) => write!(f, "skipped: {why}"),
            Outcome::RebootRequired(RebootMode::Immediate) => {
                f.write_str("reboot required (immediate)")
            }
            Outcome::RebootRequired(RebootMode::Deferred) => {
                f.write_str("reboot required (deferred)")
            }
            Outcome::RestartAgent => f.write_str("agent restart required"),
            Outcome::Failed(status) => {
                write!(f, "failed ({}): {}", status.result_code, status.message)
            }
            Outcome::Cancelled => f.write_str("cancelled"),
        }
    }
}

/// Whether a handler's updates reboot the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RebootBehaviour {
    /// Never.
    Never,
    /// Some updates do.
    Sometimes,
    /// Every update does.
    Always,
}

/// What a handler says it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Description {
    /// Its name.
    pub name: String,
    /// Its version.
    pub version: String,
    /// The update types it serves.
    pub update_types: Vec<String>,
    /// The contract version it was written for.
    pub contract: String,
    /// Whether it can roll back.
    pub supports_rollback: bool,
    /// Whether its updates reboot the device.
    pub reboot: RebootBehaviour,
}

/// What a handler sees of a payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayloadInfo {
    /// File name.
    pub name: String,
    /// Declared size.
    pub size: u64,
    /// Declared lowercase hex sha256.
    pub sha256: String,
}

/// What every step call is given.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StepContext {
    /// Job id.
    pub job_id: String,
    /// Step index.
    pub step: u32,
    /// The update type asked for.
    pub update_type: String,
    /// The manifest, as JSON text.
    pub manifest: String,
    /// The step's payloads.
    pub payloads: Vec<PayloadInfo>,
    /// The handler's device configuration, as JSON text.
    pub config: String,
    /// The plan's installed criteria, once validate returned it.
    pub installed_criteria: Option<String>,
}

/// Whether a step reboots the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RebootExpectation {
    /// It does not.
    None,
    /// It may.
    Possible,
    /// It does.
    Required,
}

/// A handler's plan of a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// What is installed once the step is done.
    pub installed_criteria: String,
    /// The payloads the step needs.
    pub payloads: Vec<String>,
    /// Whether it reboots.
    pub reboot: RebootExpectation,
    /// Warnings for the report.
    pub warnings: Vec<String>,
    /// Key-value details.
    pub details: Vec<(String, String)>,
}

/// One thing a handler manages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstalledItem {
    /// Its name.
    pub name: String,
    /// Its version.
    pub version: String,
    /// The update type managing it.
    pub update_type: String,
    /// Key-value details.
    pub details: Vec<(String, String)>,
}

/// How a step of a job stands, as journaled and reported (`installed`,
/// `already-installed`, `pending-reboot`, `pending-restart`,
/// `failed in PHASE`, `cancelled`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", from = "String")]
pub enum StepState {
    /// Installed and committed.
    Installed,
    /// Found installed; nothing changed.
    AlreadyInstalled,
    /// Installed; verify and commit wait for a reboot.
    PendingReboot,
    /// Installed; verify and commit wait for an agent restart.
    PendingRestart,
    /// Failed in a phase.
    Failed(Phase),
    /// Cancelled.
    Cancelled,
    /// A state this agent does not write (an older or foreign report),
    /// kept as read.
    Unknown(String),
}

impl StepState {
    /// Whether the step committed its change (or found it in place).
    pub fn committed(&self) -> bool {
        matches!(self, StepState::Installed | StepState::AlreadyInstalled)
    }

    /// Whether the step waits for a reboot or restart before verify.
    pub fn pending(&self) -> bool {
        matches!(self, StepState::PendingReboot | StepState::PendingRestart)
    }
}

impl fmt::Display for StepState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StepState::Installed => f.write_str("installed"),
            StepState::AlreadyInstalled => f.write_str("already-installed"),
            StepState::PendingReboot => f.write_str("pending-reboot"),
            StepState::PendingRestart => f.write_str("pending-restart"),
            StepState::Failed(phase) => write!(f, "failed in {phase}"),
            StepState::Cancelled => f.write_str("cancelled"),
            StepState::Unknown(text) => f.write_str(text),
        }
    }
}

impl From<&str> for StepState {
    fn from(text: &str) -> Self {
        match text {
            "installed" => StepState::Installed,
            "already-installed" => StepState::AlreadyInstalled,
            "pending-reboot" => StepState::PendingReboot,
            "pending-restart" => StepState::PendingRestart,
            "cancelled" => StepState::Cancelled,
            other => match other.strip_prefix("failed in ").map(str::parse) {
                Some(Ok(phase)) => StepState::Failed(phase),
                _ => StepState::Unknown(other.into()),
            },
        }
    }
}

impl From<String> for StepState {
    fn from(text: String) -> Self {
        StepState::from(text.as_str())
    }
}

impl From<StepState> for String {
    fn from(state: StepState) -> Self {
        state.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phase_names_round_trip() {
        for phase in Phase::ALL {
            assert_eq!(phase.as_str().parse::<Phase>(), Ok(phase));
            let json = serde_json::to_value(phase).expect("encode");
            assert_eq!(json, phase.as_str());
        }
        assert!("Install".parse::<Phase>().is_err());
        assert!("payloads".parse::<Phase>().is_err());
    }

    #[test]
    fn step_states_read_back_as_written() {
        let states = [
            StepState::Installed,
            StepState::AlreadyInstalled,
            StepState::PendingReboot,
            StepState::PendingRestart,
            StepState::Failed(Phase::IsInstalled),
            StepState::Cancelled,
        ];
        for state in states {
            let json = serde_json::to_string(&state).expect("encode");
            let back: StepState = serde_json::from_str(&json).expect("decode");
            assert_eq!(back, state, "{json}");
        }
        // What no agent writes is kept verbatim, never taken for a phase.
        for odd in ["failed in payloads", "failed in ", "INSTALLED", ""] {
            assert_eq!(StepState::from(odd), StepState::Unknown(odd.into()));
            assert_eq!(StepState::from(odd).to_string(), odd);
        }
    }
}
