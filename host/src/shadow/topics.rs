//! Topic layouts: the IoT Atlas "Software Update" layout and the AWS IoT
//! device shadow layout.

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

/// Which layout the device uses (`[mqtt] layout` in device.toml).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TopicLayout {
    /// `state/<deviceId>/update`, `…/update/delta`, `…/update/accepted`.
    #[default]
    IotAtlas,
    /// `$aws/things/<thing>/shadow/update`, `…/update/delta`,
    /// `…/update/accepted`, `…/get`.
    AwsShadow,
}

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
    pub fn new(layout: TopicLayout, device_id: &str) -> Result<Self> {
        let ok = !device_id.is_empty()
            && device_id.len() <= 128
            && device_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
        if !ok {
            bail!("device id {device_id:?} must be 1..=128 characters of [A-Za-z0-9-_.:]");
        }
        Ok(match layout {
            TopicLayout::IotAtlas => {
                let base = format!("state/{device_id}/update");
                Topics {
                    delta: format!("{base}/delta"),
                    accepted: format!("{base}/accepted"),
                    update: base,
                    get: None,
                    get_accepted: None,
                    rejected: None,
                }
            }
            TopicLayout::AwsShadow => {
                let base = format!("$aws/things/{device_id}/shadow");
                Topics {
                    update: format!("{base}/update"),
                    delta: format!("{base}/update/delta"),
                    accepted: format!("{base}/update/accepted"),
                    get: Some(format!("{base}/get")),
                    get_accepted: Some(format!("{base}/get/accepted")),
                    rejected: Some(format!("{base}/update/rejected")),
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_layouts_and_bad_ids() {
        let atlas = Topics::new(TopicLayout::IotAtlas, "dev-1").expect("valid");
        assert_eq!(atlas.delta, "state/dev-1/update/delta");
        assert_eq!(atlas.accepted, "state/dev-1/update/accepted");
        let aws = Topics::new(TopicLayout::AwsShadow, "dev-1").expect("valid");
        assert_eq!(aws.update, "$aws/things/dev-1/shadow/update");
        assert_eq!(aws.get.as_deref(), Some("$aws/things/dev-1/shadow/get"));
        for bad in ["", "a/b", "a+", "#", "a b"] {
            assert!(Topics::new(TopicLayout::IotAtlas, bad).is_err(), "{bad:?}");
        }
    }
}
