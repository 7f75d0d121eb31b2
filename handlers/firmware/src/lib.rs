//! The `otabox/firmware:1` handler: A/B slot images in the style of RAUC,
//! SWUpdate and Mender's rootfs-image module.
//!
//! - `validate` refuses an image for other hardware and an image larger
//!   than the inactive slot, before anything is fetched.
//! - `is-installed`: the booted slot holds this name and version, committed.
//! - `backup` records the booted and target slots, the bootloader's boot
//!   variables and what the target held.
//! - `install` streams the verified payload into the inactive slot through
//!   the host's `devices` capability (never the booted slot), which syncs,
//!   reads back and hashes; the slot is marked `writing` before the first
//!   byte and `written` only when the read-back hash matches.
//! - `apply` sets the bootloader to try the new slot once and asks for a
//!   reboot (immediate or deferred, as the manifest says).
//! - `verify`, after the reboot: the booted slot must be the new one (else
//!   the bootloader fell back), then the optional health command.
//! - `commit` gives the new slot the full count of boots; `rollback` puts
//!   the old slot first, marks the new one bad, and asks for a reboot when
//!   the device still runs the new slot.
//!
//! The bootloader variables are described in [`bootloader`].

pub mod bootloader;
pub mod manifest;
pub mod slots;
pub mod status;

use std::collections::BTreeMap;
use std::path::Path;

use otabox_sdk::prelude::*;
use otabox_sdk::{InstalledItem, devices, tail};
use serde::{Deserialize, Serialize};

use crate::manifest::{BundleKind, Config, Manifest, RebootWhen, booted_slot_from};
use crate::slots::{STATE_DIR, SlotRecord, SlotState, Slots};

/// The handler's update type.
pub const UPDATE_TYPE: &str = "otabox/firmware:1";

/// Checkpoint key of the [`Backup`].
const BACKUP_KEY: &str = "backup";

/// What `backup` recorded for the rest of the step.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Backup {
    /// The slot that was booted when the step began.
    booted: String,
    /// The slot the image goes to.
    target: String,
    /// The bootloader environment before the step.
    env: BTreeMap<String, String>,
}

/// The slot the device booted from.
fn booted(job: &Job) -> Result<String, Status> {
    booted_slot(&job.config)
}

/// The declared device of `slot`.
fn device<'a>(job: &'a Job, slot: &str) -> Result<&'a str, Status> {
    job.config.device(slot).ok_or_else(|| {
        Status::new(
            status::SLOT,
            format!("no device configured for slot {slot}"),
        )
    })
}

/// What `backup` recorded in this step.
fn backup_of() -> Result<Backup, Status> {
    checkpoint::get_json::<Backup>(BACKUP_KEY)
        .map_err(|e| Status::new(status::RECORD, format!("checkpoint: {e}")))?
        .ok_or_else(|| {
            Status::new(
                status::NO_BACKUP,
                "no backup of the boot state was taken in this step",
            )
        })
}

struct FirmwareHandler;

/// A step of this handler.
type Job = otabox_sdk::Job<FirmwareHandler>;

impl Handler for FirmwareHandler {
    type Manifest = Manifest;
    type Config = Config;

    fn describe() -> Description {
        Description::new("firmware", env!("CARGO_PKG_VERSION"), [UPDATE_TYPE])
            .with_rollback()
            .with_reboot(RebootBehaviour::Always)
    }

    /// An image built for other hardware is refused in every call.
    fn check(job: &Job) -> Result<(), Status> {
        let (manifest, config) = (&job.manifest, &job.config);
        if manifest.compatible == config.compatible {
            return Ok(());
        }
        Err(Status::new(
            status::INCOMPATIBLE,
            format!(
                "the image {} {} is built for {:?}; this device is {:?}",
                manifest.name, manifest.version, manifest.compatible, config.compatible
            ),
        )
        .detail("image-compatible", manifest.compatible.clone())
        .detail("device-compatible", config.compatible.clone()))
    }

    fn validate(job: &Job) -> Result<Plan, Status> {
        let m = &job.manifest;
        let image = job
            .step
            .payloads()
            .iter()
            .find(|p| p.name == m.image)
            .ok_or_else(|| {
                Status::new(
                    code::INVALID_MANIFEST,
                    format!(
                        "invalid firmware manifest: the step has no payload {:?}",
                        m.image
                    ),
                )
            })?;
        let booted = booted(job)?;
        let target = other_slot(&job.config, &booted)?;
        match m.bundle {
            // The bundle's own tool knows what goes where.
            Some(BundleKind::Swupdate) => {
                swupdate_config(&job.config)?;
            }
            Some(BundleKind::Rauc) => {}
            None => {
                let capacity = slot_size(device(job, &target)?)?;
                if image.size > capacity {
                    return Err(too_large(image.size, &target, capacity));
                }
            }
        }
        let mut plan = Plan::new(m.installed_criteria()).payload(m.image.clone());
        plan.reboot = RebootExpectation::Required;
        plan.details.push(("booted-slot".into(), booted));
        plan.details.push(("target-slot".into(), target));
        Ok(plan)
    }

    fn is_installed(job: &Job) -> Result<bool, Status> {
        let booted = booted(job)?;
        let slots = load_slots()?;
        Ok(slots.holds(&booted, &job.manifest.name, &job.manifest.version))
    }

    fn backup(job: &Job) -> Result<Outcome, Status> {
        let booted = booted(job)?;
        let target = other_slot(&job.config, &booted)?;
        let env = bootloader::read(&job.config.bootloader)?;
        let backup = Backup {
            booted,
            target,
            env,
        };
        checkpoint::set_json(BACKUP_KEY, &backup)
            .map_err(|e| Status::new(status::RECORD, format!("checkpoint: {e}")))?;
        info!(
            "slot {} is booted; the image goes to slot {}",
            backup.booted, backup.target
        );
        Ok(Outcome::Success)
    }

    fn install(job: &Job) -> Result<Outcome, Status> {
        install(job)
    }

    fn apply(job: &Job) -> Result<Outcome, Status> {
        let b = backup_of()?;
        // RAUC's bootloader backend switched the slot at install.
        if job.manifest.bundle != Some(BundleKind::Rauc) {
            bootloader::write(
                &job.config.bootloader,
                &bootloader::try_once(&b.target, &b.booted),
            )?;
        }
        set_state(&b.target, SlotState::Trying)?;
        info!(
            "the bootloader tries slot {} once on the next boot",
            b.target
        );
        Ok(Outcome::RebootRequired(match job.manifest.reboot {
            RebootWhen::Immediate => RebootMode::Immediate,
            RebootWhen::Deferred => RebootMode::Deferred,
        }))
    }

    fn verify(job: &Job) -> Result<Outcome, Status> {
        let b = backup_of()?;
        let booted = booted(job)?;
        if booted != b.target {
            return Err(Status::new(
                status::FELL_BACK,
                format!(
                    "the device booted slot {booted}, not the new slot {}: the bootloader fell back \
                     (slot {} did not come up within its try)",
                    b.target, b.target
                ),
            )
            .extended(Facility::Bootloader, 2, 0));
        }
        health_check(&job.config)?;
        Ok(Outcome::Success)
    }

    fn commit(job: &Job) -> Result<Outcome, Status> {
        let b = backup_of()?;
        if job.manifest.bundle == Some(BundleKind::Rauc) {
            rauc(job, &["status", "mark-good", "booted"])?;
        } else {
            bootloader::write(
                &job.config.bootloader,
                &bootloader::mark_good(&b.target, &b.booted, job.config.boot_attempts),
            )?;
        }
        set_state(&b.target, SlotState::Good)?;
        let _ = checkpoint::remove(BACKUP_KEY);
        info!("slot {} committed", b.target);
        Ok(Outcome::Success)
    }

    fn rollback(job: &Job) -> Result<Outcome, Status> {
        rollback(job)
    }

    fn inventory(config: &Config) -> Result<Vec<InstalledItem>, Status> {
        let booted = booted_slot(config).ok();
        let slots = load_slots()?;
        Ok(config
            .slots
            .keys()
            .filter_map(|slot| {
                let record = slots.0.get(slot)?;
                Some(InstalledItem {
                    name: format!("slot-{slot}"),
                    version: inventory_version(record),
                    update_type: UPDATE_TYPE.into(),
                    details: vec![
                        ("image".into(), record.name.clone()),
                        ("state".into(), state_name(record.state).into()),
                        (
                            "booted".into(),
                            (booted.as_deref() == Some(slot.as_str())).to_string(),
                        ),
                    ],
                })
            })
            .collect())
    }
}

export_handler!(FirmwareHandler);

/// A slot's version as the inventory reports it: marked when the slot
/// does not hold a usable image, so a report never shows a rolled-back
/// or half-written version as if it ran.
fn inventory_version(record: &SlotRecord) -> String {
    match record.state {
        SlotState::Bad => format!("{} (rolled back)", record.version),
        SlotState::Writing => format!("{} (incomplete)", record.version),
        _ => record.version.clone(),
    }
}

fn install(job: &Job) -> Result<Outcome, Status> {
    let b = backup_of()?;
    let booted = booted(job)?;
    if booted == b.target {
        return Err(Status::new(
            status::SLOT,
            format!(
                "slot {} is the booted slot now; it is never written",
                b.target
            ),
        ));
    }
    let m = &job.manifest;
    let image = job.step.open_payload(&m.image)?;
    let device = device(job, &b.target)?;
    if m.bundle.is_none() {
        let capacity = slot_size(device)?;
        if image.size() > capacity {
            return Err(too_large(image.size(), &b.target, capacity));
        }
    }
    let mut slots = load_slots()?;
    slots.0.insert(
        b.target.clone(),
        SlotRecord {
            name: m.name.clone(),
            version: m.version.clone(),
            sha256: image.sha256(),
            state: SlotState::Writing,
        },
    );
    save_slots(&slots)?;
    if let Some(kind) = m.bundle {
        match kind {
            BundleKind::Swupdate => install_swupdate_bundle(job, &b.target)?,
            BundleKind::Rauc => {
                info!("installing the RAUC bundle {} (slot {})", m.image, b.target);
                rauc(job, &["install", &format!("{{payload:{}}}", m.image)])?;
            }
        }
        set_state(&b.target, SlotState::Written)?;
        return Ok(Outcome::Success);
    }
    info!(
        "writing {} {} ({} bytes) to slot {}",
        m.name,
        m.version,
        image.size(),
        b.target
    );
    let written = devices::write_image(device, &image).map_err(|e| match e {
        HostError::Invalid(text) => Status::new(status::TOO_LARGE, text),
        other => Status::new(
            status::WRITE_FAILED,
            format!("writing slot {} failed: {other}", b.target),
        )
        .extended(Facility::Os, 0, 0),
    })?;
    if written != image.sha256() {
        return Err(Status::new(
            status::READBACK_MISMATCH,
            format!(
                "slot {} reads back as sha256 {written}, not the image's {}",
                b.target,
                image.sha256()
            ),
        ));
    }
    set_state(&b.target, SlotState::Written)?;
    Ok(Outcome::Success)
}

fn rollback(job: &Job) -> Result<Outcome, Status> {
    let b = backup_of()?;
    let booted = booted(job)?;
    if job.manifest.bundle == Some(BundleKind::Rauc) {
        if booted == b.target {
            rauc(job, &["status", "mark-bad", "booted"])?;
            rauc(job, &["status", "mark-active", "other"])?;
        } else {
            rauc(job, &["status", "mark-bad", "other"])?;
        }
    } else {
        let mut changes = bootloader::fall_back(&b.booted, &b.target);
        let old_left = format!("BOOT_{}_LEFT", b.booted);
        changes.extend(bootloader::restore(&b.env, &[old_left]));
        bootloader::write(&job.config.bootloader, &changes)?;
    }
    let mut slots = load_slots()?;
    if let Some(record) = slots.0.get_mut(&b.target)
        && record.name == job.manifest.name
        && record.version == job.manifest.version
    {
        record.state = SlotState::Bad;
        save_slots(&slots)?;
    }
    if booted == b.target {
        warn!(
            "the device runs slot {} that failed; slot {} boots next",
            b.target, b.booted
        );
        return Ok(Outcome::RebootRequired(RebootMode::Immediate));
    }
    info!(
        "slot {} stays booted; slot {} is marked bad",
        b.booted, b.target
    );
    Ok(Outcome::Success)
}

/// The programs, exactly as `firmware.toml` declares them.
pub const SWUPDATE: &str = "/usr/bin/swupdate";
/// See [`SWUPDATE`].
pub const RAUC: &str = "/usr/bin/rauc";

/// Runs `rauc ARGS` on the configured bus; a failure carries RAUC's words.
fn rauc(job: &Job, args: &[&str]) -> Result<(), Status> {
    let mut cmd = Command::new(RAUC).args(args.iter().map(|a| a.to_string()));
    if let Some(bus) = job.config.rauc.as_ref().and_then(|r| r.bus.clone()) {
        cmd = cmd.env("DBUS_SYSTEM_BUS_ADDRESS", bus);
    }
    let what = args.iter().take(2).copied().collect::<Vec<_>>().join(" ");
    let out = cmd
        .run()
        .map_err(|e| Status::new(status::BUNDLE, format!("cannot run rauc {what}: {e}")))?;
    if out.success() {
        return Ok(());
    }
    let both = format!("{}\n{}", out.stdout(), out.stderr());
    let said = tail(&both, 3);
    let said: Vec<&str> = said.lines().map(str::trim).collect();
    Err(out.failure(
        status::BUNDLE,
        format!("rauc {what} failed ({}): {}", out.ended(), said.join("; ")),
        Facility::Bootloader,
        4,
    ))
}

fn swupdate_config(config: &Config) -> Result<&manifest::SwupdateConfig, Status> {
    config.swupdate.as_ref().ok_or_else(|| {
        Status::new(
            status::BUNDLE,
            "the manifest carries an SWUpdate bundle, but this device has no `swupdate` configured",
        )
    })
}

/// `swupdate -i <bundle> [-e <selection of target>] <args>`: SWUpdate checks
/// the bundle's signature and image hashes and writes the slot.
fn install_swupdate_bundle(job: &Job, target: &str) -> Result<(), Status> {
    let config = swupdate_config(&job.config)?;
    let mut cmd = Command::new(SWUPDATE).args([
        "-i".to_string(),
        format!("{{payload:{}}}", job.manifest.image),
    ]);
    if let Some(selection) = config.select.get(target) {
        cmd = cmd.args(["-e".to_string(), selection.clone()]);
    }
    cmd = cmd.args(config.args.iter().cloned());
    if let Some(dir) = &config.tmpdir {
        cmd = cmd.env("TMPDIR", dir.clone());
    }
    info!(
        "installing the SWUpdate bundle {} for slot {target}",
        job.manifest.image
    );
    let out = cmd
        .run()
        .map_err(|e| Status::new(status::BUNDLE, format!("cannot run swupdate: {e}")))?;
    if out.success() {
        return Ok(());
    }
    let both = format!("{}\n{}", out.stdout(), out.stderr());
    let errors: Vec<&str> = both
        .lines()
        .filter(|l| l.contains("[ERROR]"))
        .map(swupdate_error_text)
        .collect();
    let said = if errors.is_empty() {
        both.trim().to_string()
    } else {
        errors.join("; ")
    };
    Err(out.failure(
        status::BUNDLE,
        format!("swupdate refused the bundle ({}): {said}", out.ended()),
        Facility::Bootloader,
        3,
    ))
}

/// The message of a SWUpdate `[ERROR]` line, without its prefixes:
/// `[ERROR] : SWUPDATE failed [0] ERROR : HASH mismatch : a <--> b` gives
/// `HASH mismatch : a <--> b`.
fn swupdate_error_text(line: &str) -> &str {
    let text = match (line.find("ERROR : "), line.find("] : ")) {
        (Some(i), _) if i > 1 => &line[i + "ERROR : ".len()..],
        (_, Some(i)) => &line[i + "] : ".len()..],
        _ => line,
    };
    text.trim()
}

fn health_check(config: &Config) -> Result<(), Status> {
    let Some((program, args)) = config.health_command.split_first() else {
        return Ok(());
    };
    let out = Command::new(program.clone())
        .args(args.iter().cloned())
        .run()
        .map_err(|e| {
            Status::new(
                status::UNHEALTHY,
                format!("cannot run the health check: {e}"),
            )
        })?;
    if out.success() {
        return Ok(());
    }
    let said = format!("{}{}", out.stdout(), out.stderr());
    Err(Status::new(
        status::UNHEALTHY,
        format!(
            "the health check {program} failed ({}): {}",
            out.ended(),
            said.trim()
        ),
    ))
}

fn booted_slot(config: &Config) -> Result<String, Status> {
    let text = std::fs::read_to_string(&config.booted_slot_file).map_err(|e| {
        Status::new(
            status::SLOT,
            format!(
                "cannot read the booted slot from {}: {e}",
                config.booted_slot_file
            ),
        )
    })?;
    let slot = booted_slot_from(&text).ok_or_else(|| {
        Status::new(
            status::SLOT,
            format!("{} names no slot", config.booted_slot_file),
        )
    })?;
    if !config.slots.contains_key(&slot) {
        return Err(Status::new(
            status::SLOT,
            format!("the booted slot {slot:?} is not one of the configured slots"),
        ));
    }
    Ok(slot)
}

fn other_slot(config: &Config, booted: &str) -> Result<String, Status> {
    config
        .other_slot(booted)
        .map(str::to_string)
        .ok_or_else(|| Status::new(status::SLOT, "no inactive slot configured"))
}

fn slot_size(device: &str) -> Result<u64, Status> {
    devices::info(device)
        .map(|i| i.size)
        .map_err(|e| Status::new(status::SLOT, format!("slot device {device}: {e}")))
}

fn too_large(size: u64, slot: &str, capacity: u64) -> Status {
    Status::new(
        status::TOO_LARGE,
        format!("the image ({size} bytes) is larger than slot {slot} ({capacity} bytes)"),
    )
}

fn load_slots() -> Result<Slots, Status> {
    Slots::load(Path::new(STATE_DIR)).map_err(|e| Status::new(status::RECORD, e))
}

fn save_slots(slots: &Slots) -> Result<(), Status> {
    slots
        .save(Path::new(STATE_DIR))
        .map_err(|e| Status::new(status::RECORD, e))
}

fn set_state(slot: &str, state: SlotState) -> Result<(), Status> {
    let mut slots = load_slots()?;
    let record = slots
        .0
        .get_mut(slot)
        .ok_or_else(|| Status::new(status::RECORD, format!("slot {slot} has no record")))?;
    record.state = state;
    save_slots(&slots)
}

fn state_name(state: SlotState) -> &'static str {
    match state {
        SlotState::Writing => "writing",
        SlotState::Written => "written",
        SlotState::Trying => "trying",
        SlotState::Good => "good",
        SlotState::Bad => "bad",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swupdate_errors_lose_their_prefixes() {
        assert_eq!(
            swupdate_error_text("[ERROR] : SWUPDATE failed [0] ERROR : HASH mismatch : a <--> b"),
            "HASH mismatch : a <--> b"
        );
        assert_eq!(
            swupdate_error_text("[ERROR] : SWUPDATE failed [1] Image invalid or corrupted."),
            "SWUPDATE failed [1] Image invalid or corrupted."
        );
        assert_eq!(swupdate_error_text("plain"), "plain");
    }
}
