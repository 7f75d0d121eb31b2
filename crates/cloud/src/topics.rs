//! The topics of one device, whatever its layout.

use anyhow::{Result, bail};

use super::CloudLayout;

/// The topics of one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    /// Where the device publishes reports and acknowledgements.
    pub update: String,
    /// Where the desired-state delta arrives.
    pub delta: String,
    /// Where the replica confirms a recorded report.
    pub accepted: String,
    /// Where the device asks for the whole shadow (AWS layout only).
    pub get: Option<String>,
    /// Where the answer to `get` arrives (AWS layout only).
    pub get_accepted: Option<String>,
    /// Where the shadow service refuses an update, with an error document
    /// (AWS layout only).
    pub rejected: Option<String>,
}

impl Topics {
    /// The topics of `device_id` in `layout`. The id must not contain MQTT
    /// wildcards or separators.
    pub fn new(layout: &dyn CloudLayout, device_id: &str) -> Result<Self> {
        check_device_id(device_id)?;
        Ok(layout.topics_of(device_id))
    }

    /// The topics the device subscribes to: the delta, the confirmations,
    /// and, where the layout has them, the shadow's answers and refusals.
    pub fn subscriptions(&self) -> Vec<&str> {
        [
            Some(&self.delta),
            Some(&self.accepted),
            self.get_accepted.as_ref(),
            self.rejected.as_ref(),
        ]
        .into_iter()
        .flatten()
        .map(String::as_str)
        .collect()
    }
}

/// Refuses a device id that is no topic level in every layout: empty, over
/// 128 bytes, or with characters other than `[A-Za-z0-9-_.:]` (MQTT
/// wildcards and separators among them).
pub fn check_device_id(device_id: &str) -> Result<()> {
    let ok = !device_id.is_empty()
        && device_id.len() <= 128
        && device_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
    if !ok {
        bail!("device id {device_id:?} must be 1..=128 characters of [A-Za-z0-9-_.:]");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TopicLayout;

    #[test]
    fn both_layouts_and_bad_ids() {
        let atlas = Topics::new(TopicLayout::IotAtlas.cloud(), "dev-1").expect("valid");
        assert_eq!(atlas.delta, "state/dev-1/update/delta");
        assert_eq!(atlas.accepted, "state/dev-1/update/accepted");
        let aws = Topics::new(TopicLayout::AwsShadow.cloud(), "dev-1").expect("valid");
        assert_eq!(aws.update, "$aws/things/dev-1/shadow/update");
        assert_eq!(aws.get.as_deref(), Some("$aws/things/dev-1/shadow/get"));
        for bad in ["", "a/b", "a+", "#", "a b"] {
            assert!(
                Topics::new(TopicLayout::IotAtlas.cloud(), bad).is_err(),
                "{bad:?}"
            );
        }
    }
}
