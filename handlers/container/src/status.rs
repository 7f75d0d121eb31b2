//! Result codes of the container handler. Codes below 20 are the SDK's
//! ([`otabox_sdk::code`]: 10 invalid manifest, 11 invalid config). Engine failures carry facility 5 (container
//! engine) and the CLI's exit code.

/// An image or tag is not in its registry (or the registry is unreachable).
pub const UNKNOWN_IMAGE: u32 = 40;
/// Pulling an image failed.
pub const PULL_FAILED: u32 = 41;
/// Creating a container failed.
pub const CREATE_FAILED: u32 = 42;
/// Starting a container failed.
pub const START_FAILED: u32 = 43;
/// A module did not reach its desired state in time (exited, unhealthy).
pub const NOT_RUNNING: u32 = 44;
/// Another engine operation failed.
pub const ENGINE: u32 = 45;
/// The handler's checkpoints could not be read or written.
pub const RECORD: u32 = 46;
/// A registry refused the configured login.
pub const LOGIN_FAILED: u32 = 47;
/// A create option reaches the host (host bind, host namespace,
/// `Privileged`, added capability, device) and the device does not allow it.
pub const REFUSED: u32 = 48;
/// A module's create command or env is over a limit.
pub const TOO_LARGE: u32 = 49;
/// A container the handler does not manage holds a name a module needs.
pub const NAME_TAKEN: u32 = 50;
