//! The reference device-state replica: the cloud side of the IoT Atlas
//! "Software Update" pattern, for tests, demos and small fleets.
//!
//! [`store`] keeps desired and reported state per device in SQLite;
//! [`service`] (`otabox replica`) publishes a delta when desired and
//! reported differ, records reports and acknowledgements and confirms them
//! on `…/update/accepted`, and answers shadow `get` requests; the operator
//! commands (`otabox fleet`) deploy to a device or a group and show status,
//! each device's [`outcome`] explained.

pub mod outcome;
pub mod service;
pub mod store;

pub use outcome::{Outcome, OutcomeKind};
pub use store::{Cancelled, DeviceStatus, Presence, Store};
