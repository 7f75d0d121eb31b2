//! The cloud side's commands: `otabox replica`, `otabox fleet …` and
//! `otabox demo` (which starts a broker, the replica and an agent). Built
//! with the `fleet` feature only, so the device's binary links neither the
//! replica's SQLite store nor the demo's service spawning.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Subcommand;
use otabox::outln;

/// How the replica reaches the broker.
#[derive(clap::Args)]
pub struct BrokerArgs {
    /// Broker host.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Broker port.
    #[arg(long, default_value_t = 1883)]
    port: u16,
    /// Topic layout: iot-atlas or aws-shadow.
    #[arg(long, default_value = "iot-atlas")]
    layout: String,
    /// CA certificate of the broker (turns TLS on).
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Client certificate for mutual TLS.
    #[arg(long, requires = "key_file")]
    cert_file: Option<PathBuf>,
    /// Client key for mutual TLS.
    #[arg(long, requires = "cert_file")]
    key_file: Option<PathBuf>,
    /// User name.
    #[arg(long)]
    username: Option<String>,
    /// File holding the password.
    #[arg(long, requires = "username")]
    password_file: Option<PathBuf>,
}

impl BrokerArgs {
    /// The connection settings, as `[mqtt]` in device.toml would give them.
    pub fn into_section(self) -> Result<otabox::config::MqttSection> {
        let layout = serde_json::from_value(serde_json::Value::String(self.layout.clone()))
            .with_context(|| {
                let names = otabox::cloud::TopicLayout::names();
                format!("--layout {:?}: use {names}", self.layout)
            })?;
        Ok(otabox::config::MqttSection {
            host: self.host,
            port: self.port,
            layout,
            ca_file: self.ca_file,
            cert_file: self.cert_file,
            key_file: self.key_file,
            username: self.username,
            password_file: self.password_file,
            client_id: Some("otabox-replica".into()),
            ..Default::default()
        })
    }
}

#[derive(Subcommand)]
pub enum FleetCommand {
    /// Add a device, or move it to a group.
    Register {
        /// Device id.
        device: String,
        /// Group name.
        #[arg(long)]
        group: Option<String>,
    },
    /// Deploy a deployment file (desired state, schema 1) to a device or a
    /// group; the replica publishes the delta.
    Deploy {
        /// The deployment JSON file.
        file: PathBuf,
        /// Deploy by reference: the device fetches FILE from this URL (the
        /// desired state then holds only the URL, size and sha256, which
        /// fits an AWS IoT shadow).
        #[arg(long, value_name = "URL")]
        url: Option<String>,
        /// Target device.
        #[arg(long, conflicts_with = "group", required_unless_present = "group")]
        device: Option<String>,
        /// Target group.
        #[arg(long)]
        group: Option<String>,
    },
    /// Remove a device and its acknowledgements.
    ///
    /// A device that reports again comes back.
    Unregister {
        /// Device id.
        device: String,
    },
    /// Cancel the desired job of a device or a group.
    ///
    /// A deployment the device rejected is withdrawn without sending
    /// anything (it never ran there).
    Cancel {
        /// Target device.
        #[arg(long, conflicts_with = "group", required_unless_present = "group")]
        device: Option<String>,
        /// Target group.
        #[arg(long)]
        group: Option<String>,
    },
    /// Show one device, or the fleet: what became of each deployment, and why.
    ///
    /// Per device: its shadow version (SHADOW), the desired job, its outcome
    /// (pending, running, succeeded, failed, rolled back, inconsistent,
    /// rejected, cancelled) with the device's reason (cut to fit; whole in
    /// --json), the software it reports installed, when it was last heard
    /// from, and whether it is connected (CONNECTION: online, offline for
    /// how long, or - when not known).
    Status {
        /// Only this device.
        #[arg(long)]
        device: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print each change of the fleet's state as it happens (Ctrl-C stops).
    ///
    /// Each line is led by its time (RFC 3339, UTC).
    Watch,
}

pub async fn fleet(db: &Path, command: FleetCommand) -> Result<ExitCode> {
    use otabox::replica::Store;
    let mut store = match command {
        FleetCommand::Register { .. } => Store::open(db)?,
        _ => Store::open_existing(db)?,
    };
    match command {
        FleetCommand::Register { device, group } => {
            store.register(&device, group.as_deref())?;
            outln!(
                "registered {device}{}",
                group.map(|g| format!(" in group {g}")).unwrap_or_default()
            )?;
        }
        FleetCommand::Unregister { device } => {
            store.unregister(&device)?;
            outln!("unregistered {device}")?;
        }
        FleetCommand::Deploy {
            file,
            url,
            device,
            group,
        } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let mut desired: otabox::shadow::DesiredState = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a deployment", file.display()))?;
            if let Some(url) = url {
                desired = by_reference(desired, &text, url)?;
            }
            let targets = match (device, group) {
                (Some(device), _) => {
                    store.deploy(&device, &desired)?;
                    vec![device]
                }
                (None, Some(group)) => store.deploy_group(&group, &desired)?,
                (None, None) => anyhow::bail!("give --device or --group"),
            };
            outln!("deployed {} to {}", desired.job_id, targets.join(", "))?;
        }
        FleetCommand::Cancel { device, group } => {
            let done = store.cancel(device.as_deref(), group.as_deref())?;
            print_cancelled(&done)?;
        }
        FleetCommand::Status { device, json } => {
            let devices = match device {
                Some(id) => vec![
                    store
                        .status(&id)?
                        .with_context(|| format!("unknown device {id}"))?,
                ],
                None => store.fleet()?,
            };
            if json {
                outln!("{}", serde_json::to_string_pretty(&devices)?)?;
            } else {
                print_fleet(&devices)?;
            }
        }
        FleetCommand::Watch => watch(&store).await?,
    }
    Ok(ExitCode::SUCCESS)
}

/// `desired` (whose file holds `text`) as a deployment by reference to
/// `url`; the file is checked as the device will check it.
fn by_reference(
    desired: otabox::shadow::DesiredState,
    text: &str,
    url: String,
) -> Result<otabox::shadow::DesiredState> {
    desired.validate().context("invalid deployment")?;
    let reference = otabox::shadow::DesiredState {
        steps: Vec::new(),
        signed_manifest: None,
        root_rotations: Vec::new(),
        deployment_ref: Some(otabox::shadow::DeploymentRef {
            url,
            size: text.len() as u64,
            sha256: otabox::runtime::sha256_hex(text.as_bytes()),
        }),
        ..desired
    };
    reference.resolve(text.as_bytes())?;
    Ok(reference)
}

/// One line per kind of what `fleet cancel` did.
fn print_cancelled(done: &[(String, otabox::replica::Cancelled)]) -> Result<()> {
    use otabox::replica::Cancelled;
    let lines = [
        (Cancelled::Sent, "cancel sent to"),
        (
            Cancelled::Withdrawn,
            "withdrawn (the device had rejected it; nothing sent):",
        ),
        (Cancelled::Already, "already cancelled:"),
    ];
    for (kind, text) in lines {
        let ids: Vec<&str> = done
            .iter()
            .filter(|(_, k)| *k == kind)
            .map(|(id, _)| id.as_str())
            .collect();
        if !ids.is_empty() {
            outln!("{text} {}", ids.join(", "))?;
        }
    }
    Ok(())
}

/// Most bytes of the reason in the `fleet status` table (`--json` has it
/// whole).
const REASON_WIDTH: usize = 60;
/// Most bytes of an id in the table (ids are not cut: a device id from a
/// topic may hold control characters, which are escaped).
const NAME_WIDTH: usize = 256;
/// Most bytes of the installed software in the table.
const SOFTWARE_WIDTH: usize = 24;

/// A device-provided text for the table: control characters escaped, cut
/// to `max` bytes.
fn cell(text: &str, max: usize) -> String {
    otabox::runtime::bounds::text(text.to_string(), max)
}

/// The header of the fleet table; `fleet watch` leads with the time and
/// leaves out the last-seen column (its line's time says it).
fn fleet_header(watching: bool) -> String {
    let (time, seen) = if watching {
        (format!("{:<22}", "TIME"), String::new())
    } else {
        (String::new(), format!("{:<10} ", "LAST SEEN"))
    };
    format!(
        "{time}{:<16} {:<10} {:>6} {:<20} {:<12} {:<24} {seen}{:<16} REASON",
        "DEVICE", "GROUP", "SHADOW", "JOB", "OUTCOME", "SOFTWARE", "CONNECTION"
    )
}

/// `online`, `offline for 5m` (with `now`; `offline` without), or `-`
/// when the device's connection is not known.
fn connection(presence: Option<otabox::replica::Presence>, now: Option<i64>) -> String {
    match (presence, now) {
        (None, _) => "-".into(),
        (Some(p), _) if p.online => "online".into(),
        (Some(p), Some(now)) => format!("offline for {}", span(now - p.since)),
        (Some(_), None) => "offline".into(),
    }
}

/// One device's line; with `now` (seconds since the epoch) it says how long
/// ago the device was last heard from.
fn fleet_row(d: &otabox::replica::DeviceStatus, now: Option<i64>) -> String {
    let software = d
        .reported
        .as_ref()
        .and_then(|r| r.get("installed"))
        .and_then(|i| i.as_object())
        .map(|i| {
            i.values()
                .filter_map(|v| v.as_str())
                .collect::<Vec<_>>()
                .join(",")
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "-".into());
    let seen = now.map_or(String::new(), |now| {
        format!(
            "{:<10} ",
            d.last_seen.map_or("never".into(), |t| ago(now - t))
        )
    });
    format!(
        "{:<16} {:<10} {:>6} {:<20} {:<12} {:<24} {seen}{:<16} {}",
        cell(&d.id, NAME_WIDTH),
        cell(d.group.as_deref().unwrap_or("-"), NAME_WIDTH),
        d.version,
        cell(
            d.job().or(d.withdrawn.as_deref()).unwrap_or("-"),
            NAME_WIDTH
        ),
        d.outcome.kind.label(),
        cell(&software, SOFTWARE_WIDTH),
        connection(d.presence, now),
        cell(d.outcome.reason.as_deref().unwrap_or("-"), REASON_WIDTH),
    )
}

/// `secs` as `12s ago`, `5m ago`, `3h ago` or `2d ago`.
fn ago(secs: i64) -> String {
    format!("{} ago", span(secs))
}

/// `secs` as `12s`, `5m`, `3h` or `2d`.
fn span(secs: i64) -> String {
    let secs = secs.max(0);
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..86_400 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86_400),
    }
}

fn print_fleet(devices: &[otabox::replica::DeviceStatus]) -> Result<()> {
    outln!("{}", fleet_header(false))?;
    let now = otabox::clock::now_secs() as i64;
    for d in devices {
        outln!("{}", fleet_row(d, Some(now)))?;
    }
    Ok(())
}

async fn watch(store: &otabox::replica::Store) -> Result<()> {
    let mut last: std::collections::BTreeMap<String, String> = Default::default();
    outln!("{}", fleet_header(true))?;
    loop {
        for device in store.fleet()? {
            let row = fleet_row(&device, None);
            if last.get(&device.id) != Some(&row) {
                outln!(
                    "{:<22}{row}",
                    otabox::clock::rfc3339(otabox::clock::now_secs())
                )?;
                last.insert(device.id.clone(), row);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

pub async fn demo(dir: Option<PathBuf>, keep: bool) -> Result<ExitCode> {
    let root = match dir {
        Some(dir) => dir,
        None => std::env::temp_dir().join(format!("otabox-demo-{}", std::process::id())),
    };
    let outcome = otabox::demo::run(&root).await;
    if keep {
        outln!("\nkept {}", root.display())?;
    } else {
        let _ = std::fs::remove_dir_all(&root);
    }
    outcome?;
    Ok(ExitCode::SUCCESS)
}
