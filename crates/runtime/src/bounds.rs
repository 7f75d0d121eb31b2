//! The contract's bounds on what a handler hands the host, enforced where
//! the WIT values enter it: every guest-provided text is escaped (control
//! characters become visible `\n`, `\u{1b}`, … so no guest text can start a
//! log line or drive a terminal) and cut to its bound on a character
//! boundary with a `…` marker; lists are cut to their bound with a note of
//! how many entries were dropped. A value that is an identity (installed
//! criteria, planned payload names) is never cut: over its bound the call
//! is refused as a breach of the contract.

use super::bindings::{Description, InstalledItem, Outcome, Plan, Status};
pub use otabox_core::escape::{MARKER, text};

/// Most bytes of a status message or a `skipped` text (marker included).
pub const MAX_MESSAGE: usize = 1024;
/// Most key/value details of a status, a plan or an inventory item.
pub const MAX_DETAILS: usize = 32;
/// Most bytes of a detail key.
pub const MAX_DETAIL_KEY: usize = 64;
/// Most bytes of a detail value.
pub const MAX_DETAIL_VALUE: usize = 1024;
/// Most warnings of a plan.
pub const MAX_WARNINGS: usize = 32;
/// Most bytes of a plan's installed criteria (refused beyond).
pub const MAX_CRITERIA: usize = 1024;
/// Most payload names a plan may list (refused beyond).
pub const MAX_PLAN_PAYLOADS: usize = 1024;
/// Most bytes of a short text: names, versions, update types, the
/// contract version, planned payload names (refused beyond for those).
pub const MAX_NAME: usize = 256;
/// Most update types a description may list.
pub const MAX_UPDATE_TYPES: usize = 64;
/// Most items an inventory may list.
pub const MAX_INVENTORY_ITEMS: usize = 4096;
/// Most details of one inventory item.
pub const MAX_ITEM_DETAILS: usize = 16;
/// Most bytes of an inventory item's detail value.
pub const MAX_ITEM_VALUE: usize = 256;

/// The detail key that says how many details were dropped.
pub const DROPPED_KEY: &str = "otabox.dropped";

/// Details cut to `max` pairs (the last one then says how many were
/// dropped), keys and values escaped and cut.
pub fn details(
    mut pairs: Vec<(String, String)>,
    max: usize,
    value_max: usize,
) -> Vec<(String, String)> {
    let dropped = pairs.len().saturating_sub(max);
    if dropped > 0 {
        pairs.truncate(max - 1);
    }
    let mut kept: Vec<(String, String)> = pairs
        .into_iter()
        .map(|(k, v)| (text(k, MAX_DETAIL_KEY), text(v, value_max)))
        .collect();
    if dropped > 0 {
        kept.push((DROPPED_KEY.into(), format!("{} more details", dropped + 1)));
    }
    kept
}

/// A status within the contract's bounds.
pub fn status(mut s: Status) -> Status {
    s.message = text(std::mem::take(&mut s.message), MAX_MESSAGE);
    s.details = details(
        std::mem::take(&mut s.details),
        MAX_DETAILS,
        MAX_DETAIL_VALUE,
    );
    s
}

/// An outcome within the contract's bounds.
pub fn outcome(o: Outcome) -> Outcome {
    match o {
        Outcome::Failed(s) => Outcome::Failed(status(s)),
        Outcome::Skipped(why) => Outcome::Skipped(text(why, MAX_MESSAGE)),
        other => other,
    }
}

/// A plan within the contract's bounds, or why it breaks them: installed
/// criteria and payload names are identities, refused rather than cut.
pub fn plan(mut p: Plan) -> Result<Plan, String> {
    if p.installed_criteria.len() > MAX_CRITERIA {
        return Err(format!(
            "its plan's installed criteria is {} bytes (at most {MAX_CRITERIA})",
            p.installed_criteria.len()
        ));
    }
    if p.payloads.len() > MAX_PLAN_PAYLOADS {
        return Err(format!(
            "its plan lists {} payloads (at most {MAX_PLAN_PAYLOADS})",
            p.payloads.len()
        ));
    }
    if let Some(long) = p.payloads.iter().find(|n| n.len() > MAX_NAME) {
        return Err(format!(
            "its plan names a payload of {} bytes (at most {MAX_NAME})",
            long.len()
        ));
    }
    p.installed_criteria = text(std::mem::take(&mut p.installed_criteria), MAX_CRITERIA);
    p.warnings = warnings(std::mem::take(&mut p.warnings));
    p.details = details(
        std::mem::take(&mut p.details),
        MAX_DETAILS,
        MAX_DETAIL_VALUE,
    );
    Ok(p)
}

fn warnings(mut list: Vec<String>) -> Vec<String> {
    let dropped = list.len().saturating_sub(MAX_WARNINGS);
    if dropped > 0 {
        list.truncate(MAX_WARNINGS - 1);
    }
    let mut kept: Vec<String> = list.into_iter().map(|w| text(w, MAX_MESSAGE)).collect();
    if dropped > 0 {
        kept.push(format!("{} more warnings dropped", dropped + 1));
    }
    kept
}

/// An inventory within the contract's bounds: at most
/// [`MAX_INVENTORY_ITEMS`] items (the rest dropped and logged), each with
/// its texts and details bounded.
pub fn inventory(handler: &str, mut items: Vec<InstalledItem>) -> Vec<InstalledItem> {
    if items.len() > MAX_INVENTORY_ITEMS {
        tracing::warn!(
            handler,
            "inventory cut to {MAX_INVENTORY_ITEMS} items: {} more dropped",
            items.len() - MAX_INVENTORY_ITEMS
        );
        items.truncate(MAX_INVENTORY_ITEMS);
    }
    items
        .into_iter()
        .map(|i| InstalledItem {
            name: text(i.name, MAX_NAME),
            version: text(i.version, MAX_NAME),
            update_type: text(i.update_type, MAX_NAME),
            details: details(i.details, MAX_ITEM_DETAILS, MAX_ITEM_VALUE),
        })
        .collect()
}

/// A description within the contract's bounds.
pub fn description(mut d: Description) -> Description {
    d.name = text(d.name, MAX_NAME);
    d.version = text(d.version, MAX_NAME);
    d.contract = text(d.contract, MAX_NAME);
    d.update_types.truncate(MAX_UPDATE_TYPES);
    d.update_types = d
        .update_types
        .into_iter()
        .map(|t| text(t, MAX_NAME))
        .collect();
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_nothing_else_changes() {
        assert_eq!(text("plain é text".into(), 64), "plain é text");
        assert_eq!(
            text("a\nERROR forged\r\0\u{1b}[31m\u{85}\u{202e}".into(), 128),
            "a\\nERROR forged\\r\\0\\u{1b}[31m\\u{85}\\u{202e}"
        );
    }

    #[test]
    fn long_texts_are_cut_on_a_char_boundary_with_the_marker() {
        let cut = text("é".repeat(600), 1024);
        assert!(cut.len() <= 1024, "{}", cut.len());
        assert!(cut.ends_with(MARKER));
        assert_eq!(cut.trim_end_matches(MARKER), "é".repeat(510));
        let escapes = text("\n".repeat(10_000), 100);
        assert!(
            escapes.len() <= 100 && escapes.ends_with(MARKER),
            "{escapes}"
        );
        assert_eq!(text("x".repeat(1024), 1024), "x".repeat(1024));
        assert_eq!(text(format!("{}\n", "x".repeat(1021)), 1024).len(), 1023);
    }

    #[test]
    fn a_huge_status_is_bounded() {
        let s = status(Status {
            result_code: 1,
            extended_code: crate::bindings::ExtendedCode {
                facility: 1,
                component: 0,
                value: 0,
            },
            message: "m".repeat(50 << 20),
            details: (0..1_000_000)
                .map(|i| (format!("k{i}{}", "k".repeat(100)), "v".repeat(5000)))
                .collect(),
        });
        assert!(s.message.len() <= MAX_MESSAGE);
        assert_eq!(s.details.len(), MAX_DETAILS);
        assert!(
            s.details
                .iter()
                .all(|(k, v)| k.len() <= MAX_DETAIL_KEY && v.len() <= MAX_DETAIL_VALUE)
        );
        assert_eq!(
            s.details.last(),
            Some(&(DROPPED_KEY.to_string(), "999969 more details".to_string()))
        );
    }
}
