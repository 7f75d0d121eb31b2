//! Builders for [`Status`], [`Plan`] and [`Description`].

use crate::{
    CONTRACT_VERSION, Description, ExtendedCode, Outcome, Plan, RebootBehaviour, RebootExpectation,
    Status,
};

/// Well-known facilities of an extended code (0 is the host's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Facility {
    /// The handler's own logic.
    Handler = 1,
    /// The operating system (files, processes).
    Os = 2,
    /// The network.
    Network = 3,
    /// A package manager (apt, dpkg).
    PackageManager = 4,
    /// A container engine.
    ContainerEngine = 5,
    /// The bootloader.
    Bootloader = 6,
}

/// Constructors and builders for [`Status`].
pub trait StatusExt: Sized {
    /// A failure with `result_code` and `message` (facility: handler).
    fn new(result_code: u32, message: impl Into<String>) -> Self;
    /// Sets the extended code.
    fn extended(self, facility: Facility, component: u8, value: u32) -> Self;
    /// Adds a key/value detail.
    fn detail(self, key: impl Into<String>, value: impl Into<String>) -> Self;
    /// Wraps the status as a failed [`Outcome`].
    fn fail(self) -> Outcome;
}

impl StatusExt for Status {
    fn new(result_code: u32, message: impl Into<String>) -> Self {
        Status {
            result_code,
            extended_code: ExtendedCode {
                facility: Facility::Handler as u8,
                component: 0,
                value: 0,
            },
            message: message.into(),
            details: Vec::new(),
        }
    }

    fn extended(mut self, facility: Facility, component: u8, value: u32) -> Self {
        self.extended_code = ExtendedCode {
            facility: facility as u8,
            component,
            value,
        };
        self
    }

    fn detail(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.details.push((key.into(), value.into()));
        self
    }

    fn fail(self) -> Outcome {
        Outcome::Failed(self)
    }
}

impl Plan {
    /// A plan with `installed_criteria`, no payloads, no reboot.
    pub fn new(installed_criteria: impl Into<String>) -> Self {
        Plan {
            installed_criteria: installed_criteria.into(),
            payloads: Vec::new(),
            reboot: RebootExpectation::None,
            warnings: Vec::new(),
            details: Vec::new(),
        }
    }

    /// Adds a payload the step needs.
    pub fn payload(mut self, name: impl Into<String>) -> Self {
        self.payloads.push(name.into());
        self
    }

    /// Adds a warning for the report.
    pub fn warning(mut self, text: impl Into<String>) -> Self {
        self.warnings.push(text.into());
        self
    }
}

impl Description {
    /// A description for `name` serving `update_types` (first canonical),
    /// built against this SDK's contract, without rollback or reboots.
    pub fn new<I, S>(name: &str, version: &str, update_types: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Description {
            name: name.into(),
            version: version.into(),
            update_types: update_types.into_iter().map(Into::into).collect(),
            contract: CONTRACT_VERSION.into(),
            supports_rollback: false,
            reboot: RebootBehaviour::Never,
        }
    }

    /// Declares rollback support.
    pub fn with_rollback(mut self) -> Self {
        self.supports_rollback = true;
        self
    }

    /// Declares the reboot behaviour.
    pub fn with_reboot(mut self, reboot: RebootBehaviour) -> Self {
        self.reboot = reboot;
        self
    }
}
