//! Host-side bindings of the `otabox:handler` WIT package.
//!
//! Imports are async (process execution and file reads await) and
//! trappable (a host bug becomes a trap of that call, never a host panic);
//! exports are async so calls can be bounded by epochs and timeouts. The
//! `payload` resource is backed by [`super::imports::payloads::PayloadHandle`].

wasmtime::component::bindgen!({
    path: "../../sdk/wit",
    world: "update-handler",
    imports: { default: async | trappable },
    exports: { default: async },
    with: {
        "otabox:handler/payloads.payload": super::imports::payloads::PayloadHandle,
    },
});

pub use self::exports::otabox::handler::handler::{Description, InstalledItem, Plan, StepContext};
pub use self::otabox::handler::types::{
    ExtendedCode, HostError, LogLevel, Outcome, PayloadInfo, Phase, RebootBehaviour,
    RebootExpectation, RebootMode, Status,
};
