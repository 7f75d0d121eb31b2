//! The domain model between the agent and its handlers: what a handler is
//! asked ([`Phase`], [`StepContext`]), what it answers ([`Outcome`],
//! [`Status`], [`Plan`], [`Description`], [`InstalledItem`]), how a step
//! ended for the report ([`StepState`]), and the [`UpdateHandler`] trait the
//! agent and the step workflow run against.
//!
//! Nothing here knows of wasm: the sandboxed handler of
//! `runtime::Handler` is one implementation, converting the WIT
//! types at its edge; `testing::FakeHandler` (tests, or the `testing`
//! feature) is another, scripted per phase.

mod handler;
mod scope;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
mod types;

pub use handler::{CallFault, UpdateHandler, fault_of};
pub use scope::{CallScope, CancelFlag, PayloadFile, ProgressEvent, ProgressSink};
pub use types::{
    Description, ExtendedCode, InstalledItem, Outcome, PayloadInfo, Phase, Plan, RebootBehaviour,
    RebootExpectation, RebootMode, Status, StepContext, StepState, UnknownPhase, pack,
};
