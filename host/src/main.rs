//! The `otabox` command line.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use otabox::audit::{Severity, audit_dir, render_text};
use otabox::config::DeviceConfig;
use otabox::runtime::{HandlerSet, Runtime};
use otabox::{console, out, outln};

/// Default device configuration file.
const DEFAULT_CONFIG: &str = "/etc/otabox/device.toml";

/// The environment the command line reads, shown by `--help`.
const ENVIRONMENT_HELP: &str = "Environment:
  OTABOX_LOG  the log filter (as --log)
  NO_COLOR    any non-empty value turns colour off in the logs (logs on
              stderr are coloured only when it is a terminal)

Output piped into a reader that stops early (`| head`) ends the command
quietly with status 141.";

/// otabox: over-the-air updates whose update types are sandboxed
/// WebAssembly handlers.
#[derive(Parser)]
#[command(version, about, long_about = None, after_help = ENVIRONMENT_HELP)]
struct Cli {
    /// Log filter, such as `info`, `debug` or `otabox=debug,handler=trace`
    /// (default: `info` for `run` and `replica`, `error` for `demo`, `warn`
    /// otherwise).
    #[arg(long, global = true, env = "OTABOX_LOG")]
    log: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: connect to the broker, follow the device shadow and
    /// run each deployment through its handlers, until SIGTERM or Ctrl-C.
    Run {
        /// Device configuration.
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Show what the agent of this device is doing: its state, the job and
    /// its phase, installed criteria per update type, the last result with
    /// its reason, the broker connection and the reports not yet sent. Reads
    /// the state directory only; a running agent is not disturbed.
    Status {
        /// Device configuration.
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Install a deployment (a desired state, schema 1, as `fleet deploy`
    /// takes) through the running agent: it is checked exactly as a delta
    /// from the cloud (the same size, schema and signature rules: with a
    /// `[trust] root` it must carry a valid `signedManifest`), journaled and
    /// run as any job, reported to the cloud (with `"local": true` in its
    /// `lastResult`) but not acknowledged. It waits for a running job to
    /// end. Waits for the result and prints it; exits 1 when the job fails
    /// or is refused, or when no agent runs.
    Install {
        /// Device configuration.
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// The deployment JSON file.
        file: PathBuf,
        /// Return once the deployment is queued for the agent.
        #[arg(long)]
        no_wait: bool,
    },
    /// Run the reference device-state replica (the cloud side): publish
    /// deltas, record reports and acknowledgements, answer get requests.
    Replica {
        /// The replica's SQLite database (created when missing).
        #[arg(long)]
        db: PathBuf,
        #[command(flatten)]
        broker: BrokerArgs,
    },
    /// Operate a fleet through the replica's database.
    Fleet {
        /// The replica's SQLite database (`register` and `otabox replica`
        /// create it; the other commands refuse a missing one).
        #[arg(long)]
        db: PathBuf,
        #[command(subcommand)]
        command: FleetCommand,
    },
    /// Create an ed25519 signing key: `<out>/<name>.key` (secret, mode 0600)
    /// and `<out>/<name>.pub`.
    Keygen {
        /// Directory to write to.
        #[arg(long, default_value = ".")]
        out: PathBuf,
        /// Key name.
        #[arg(long)]
        name: String,
    },
    /// Sign a deployment (adds its signed update manifest), or with
    /// `--root-next` a next root for rotation; prints the signed JSON.
    Sign {
        /// Secret key files (`.key`); each signs.
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
        /// The deployment (desired state JSON), or the next root with `--root-next`.
        file: PathBuf,
        /// Sign `file` as the next root (rotation) instead of a deployment.
        #[arg(long)]
        root_next: bool,
        /// Sequence number (must exceed every earlier one for the target).
        #[arg(long, required_unless_present = "root_next")]
        sequence: Option<u64>,
        /// Target device.
        #[arg(long, conflicts_with = "group")]
        device: Option<String>,
        /// Target group.
        #[arg(long)]
        group: Option<String>,
        /// Validity from now, in seconds.
        #[arg(long, default_value_t = 7 * 24 * 3600)]
        valid_for: u64,
    },
    /// Verify a signed deployment against a root (or, with `--rotation`, a
    /// signed next root against the current one). Exits 1 when it fails.
    Verify {
        /// The current root (JSON: version, threshold, keys).
        #[arg(long)]
        root: PathBuf,
        /// The signed deployment, or the signed next root with `--rotation`.
        file: PathBuf,
        /// Check a root rotation instead of a deployment.
        #[arg(long)]
        rotation: bool,
        /// The device that would run it.
        #[arg(long, required_unless_present = "rotation")]
        device: Option<String>,
        /// Groups of that device.
        #[arg(long = "group")]
        groups: Vec<String>,
        /// Highest sequence the device accepted so far.
        #[arg(long, default_value_t = 0)]
        last_sequence: u64,
    },
    /// Print the version of otabox (as `--version`).
    Version,
    /// Inspect the installed handlers.
    Handlers {
        #[command(subcommand)]
        command: HandlersCommand,
    },
    /// Walk through a whole update with the built-in file handler in a
    /// scratch directory (nothing outside it is touched).
    Demo {
        /// Directory to run in (default: a new temporary directory).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Keep the directory afterwards.
        #[arg(long)]
        keep: bool,
    },
}

/// How the replica reaches the broker.
#[derive(clap::Args)]
struct BrokerArgs {
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
    fn into_section(self) -> Result<otabox::config::MqttSection> {
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

/// Where handlers and grants come from.
#[derive(clap::Args)]
struct Source {
    /// Device configuration (handler directory and per-handler grants).
    #[arg(long, short, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    /// Handler directory to use instead of the config's (without a config
    /// file, every handler gets what it declares, and checkpoints and the
    /// compiled-component cache live in `$XDG_STATE_HOME/otabox`, default
    /// `~/.local/state/otabox`).
    #[arg(long)]
    dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum FleetCommand {
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

#[derive(Subcommand)]
enum HandlersCommand {
    /// Load every handler and show its status, version and update types.
    List {
        #[command(flatten)]
        source: Source,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Compare what each handler declares, what the device grants and what
    /// the component really imports. Exits 1 when any error is found.
    Audit {
        #[command(flatten)]
        source: Source,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Make every risk finding an error (docs/audit.md).
        #[arg(long)]
        strict: bool,
        /// Make the findings with this id errors (repeatable).
        #[arg(long, value_name = "ID")]
        deny: Vec<String>,
    },
    /// Call one lifecycle phase of a handler (or the whole step) against a
    /// manifest, outside any job, and print the result as JSON. Calls with
    /// the same --job share checkpoints, so backup, install and rollback can
    /// follow one another. Exits 1 when the phase fails. Refused while an
    /// agent runs on the same state directory (use `otabox install`).
    RunPhase {
        #[command(flatten)]
        source: Source,
        /// The handler (its manifest's file name without `.toml`).
        #[arg(long)]
        handler: String,
        /// The phase to call.
        #[arg(long, value_enum)]
        phase: otabox::run_phase::PhaseChoice,
        /// The step manifest: a JSON file, or JSON text starting with `{`.
        #[arg(long, default_value = "{}")]
        manifest: String,
        /// The update type to ask for (default: the handler's first).
        #[arg(long)]
        update_type: Option<String>,
        /// A payload file as NAME=PATH (repeatable); its size and sha256
        /// are taken from the file.
        #[arg(long = "payload", value_parser = otabox::run_phase::parse_payload)]
        payloads: Vec<(String, PathBuf)>,
        /// Job id; checkpoints live in STATE/tryout/JOB.
        #[arg(long, default_value = "tryout")]
        job: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            report_error(&anyhow::Error::new(e).context("cannot start the async runtime"));
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(e) if console::is_stdout_closed(&e) => ExitCode::from(console::STDOUT_CLOSED_STATUS),
        Err(e) => {
            report_error(&e);
            ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr, coloured only on a terminal and without `NO_COLOR`.
fn init_logging(cli: &Cli) {
    let default_log = match cli.command {
        Command::Run { .. } | Command::Replica { .. } => "info",
        // The demo's printout is its interface; its services' warnings as it
        // shuts them down are noise.
        Command::Demo { .. } => "error",
        _ => "warn",
    };
    let filter = cli.log.as_deref().unwrap_or(default_log);
    let color = console::use_color(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| default_log.into()),
        )
        .with_ansi(color)
        .with_writer(std::io::stderr)
        .init();
}

/// Prints `error` with its causes on stderr (nothing if stderr is gone too).
fn report_error(error: &anyhow::Error) {
    let _ = writeln!(std::io::stderr(), "error: {error:#}");
}

async fn dispatch(command: Command) -> Result<ExitCode> {
    match command {
        Command::Handlers {
            command: HandlersCommand::List { source, json },
        } => list(&source, json).await,
        Command::Handlers {
            command:
                HandlersCommand::Audit {
                    source,
                    json,
                    strict,
                    deny,
                },
        } => audit(&source, json, &otabox::audit::Policy { strict, deny }).await,
        Command::Handlers {
            command:
                HandlersCommand::RunPhase {
                    source,
                    handler,
                    phase,
                    manifest,
                    update_type,
                    payloads,
                    job,
                },
        } => {
            let tryout = otabox::run_phase::Tryout {
                phase,
                manifest: read_manifest_arg(&manifest)?,
                update_type,
                payloads,
                job_dir: PathBuf::new(),
                job_id: job,
            };
            run_phase(&source, &handler, tryout).await
        }
        Command::Demo { dir, keep } => demo(dir, keep).await,
        Command::Version => {
            outln!("otabox {}", env!("CARGO_PKG_VERSION"))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Replica { db, broker } => {
            let mqtt = broker.into_section()?;
            otabox::replica::service::run(otabox::replica::service::ReplicaOptions { db, mqtt })
                .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Fleet { db, command } => fleet(&db, command).await,
        Command::Keygen { out, name } => keygen(&out, &name),
        Command::Sign {
            keys,
            file,
            root_next,
            sequence,
            device,
            group,
            valid_for,
        } => sign(&keys, &file, root_next, sequence, device, group, valid_for),
        Command::Verify {
            root,
            file,
            rotation,
            device,
            groups,
            last_sequence,
        } => verify(
            &root,
            &file,
            rotation,
            device.as_deref(),
            &groups,
            last_sequence,
        ),
        Command::Status { config, json } => {
            let status = otabox::status::read(&DeviceConfig::load(&config)?.paths.state)?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&status)?)?;
            } else {
                out!("{}", status.render())?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Install {
            config,
            file,
            no_wait,
        } => {
            let config = DeviceConfig::load(&config)?;
            let ok = otabox::install::run(&config, &file, !no_wait).await?;
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Run { config } => {
            otabox::agent::run(DeviceConfig::load(&config)?).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The device config for `source`: the file, or defaults when only `--dir`
/// is given.
fn device_config(source: &Source) -> Result<DeviceConfig> {
    let mut config = if source.config.exists() || source.dir.is_none() {
        DeviceConfig::load(&source.config)
            .with_context(|| "pass --config FILE, or --dir DIR for a bare handler directory")?
    } else {
        let mut config = DeviceConfig::default();
        config.paths.state = user_state_dir()?;
        config.paths.cache = None;
        config
    };
    if let Some(dir) = &source.dir {
        config.paths.handlers = dir.clone();
    }
    Ok(config)
}

/// Where a bare `--dir` keeps `run-phase` checkpoints (`tryout/JOB`) and
/// the compiled-component cache (`cache`): `$XDG_STATE_HOME/otabox`, else
/// `~/.local/state/otabox`, created 0700. Never a shared directory such as
/// /tmp, where another user could plant checkpoints or native code that
/// the cache loads unchecked.
fn user_state_dir() -> Result<PathBuf> {
    let base = match std::env::var_os("XDG_STATE_HOME").filter(|d| Path::new(d).is_absolute()) {
        Some(dir) => PathBuf::from(dir),
        None => {
            let home = std::env::var_os("HOME")
                .filter(|h| Path::new(h).is_absolute())
                .context("HOME is not set: pass --config FILE with [paths] state")?;
            PathBuf::from(home).join(".local/state")
        }
    };
    let dir = base.join("otabox");
    otabox::durable::create_private_dir(&dir)?;
    otabox::durable::make_private(&dir)?;
    Ok(dir)
}

async fn list(source: &Source, json: bool) -> Result<ExitCode> {
    let config = device_config(source)?;
    let runtime = Runtime::new(Some(config.cache_dir()))?;
    let set = runtime
        .load_dir(&config.paths.handlers, &config.handlers)
        .await?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&list_json(&set))?)?;
    } else {
        print_list(&set, &config.paths.handlers)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn list_json(set: &HandlerSet) -> serde_json::Value {
    let loaded = set.handlers.iter().map(|h| {
        serde_json::json!({
            "name": h.name, "status": "loaded", "file": h.wasm_path, "sha256": h.sha256,
            "version": h.description.version, "contract": h.contract,
            "update_types": h.manifest.handler.update_types, "supports_rollback": h.description.supports_rollback,
            "grants": &*h.grants, "cache": h.cache,
        })
    });
    let refused = set.refused.iter().map(|r| {
        serde_json::json!({"name": r.name, "status": "refused", "manifest": r.manifest, "error": format!("{:#}", r.error)})
    });
    let disabled = set
        .disabled
        .iter()
        .map(|n| serde_json::json!({"name": n, "status": "disabled"}));
    serde_json::Value::Array(loaded.chain(refused).chain(disabled).collect())
}

fn print_list(set: &HandlerSet, dir: &Path) -> Result<()> {
    outln!(
        "{:<12} {:<9} {:<9} {:<14} {:<30} FILE",
        "NAME",
        "STATUS",
        "VERSION",
        "SHA256",
        "UPDATE TYPES"
    )?;
    for h in &set.handlers {
        outln!(
            "{:<12} {:<9} {:<9} {:<14} {:<30} {}",
            h.name,
            "loaded",
            h.description.version,
            &h.sha256[..12],
            h.manifest.handler.update_types.join(","),
            h.wasm_path.display()
        )?;
    }
    for r in &set.refused {
        outln!("{:<12} {:<9} {:#}", r.name, "refused", r.error)?;
    }
    for name in &set.disabled {
        outln!("{name:<12} disabled")?;
    }
    if set.handlers.is_empty() && set.refused.is_empty() && set.disabled.is_empty() {
        outln!("(no handlers in {})", dir.display())?;
    }
    Ok(())
}

/// A manifest given as JSON text (starting with `{`) or as a file path.
fn read_manifest_arg(arg: &str) -> Result<String> {
    if arg.trim_start().starts_with('{') {
        return Ok(arg.to_string());
    }
    std::fs::read_to_string(arg).with_context(|| format!("cannot read manifest {arg}"))
}

async fn run_phase(
    source: &Source,
    name: &str,
    mut tryout: otabox::run_phase::Tryout,
) -> Result<ExitCode> {
    let config = device_config(source)?;
    let _lock = otabox::local::StateLock::share(&config.paths.state, "handlers run-phase")?;
    let runtime = Runtime::new(Some(config.cache_dir()))?;
    let manifest_path = config.paths.handlers.join(format!("{name}.toml"));
    let handler = runtime
        .load_handler(&manifest_path, config.handlers.get(name))
        .await?;
    tryout.job_dir = config.paths.state.join("tryout").join(&tryout.job_id);
    let (result, ok) = otabox::run_phase::run(&handler, &tryout).await?;
    outln!("{}", serde_json::to_string_pretty(&result)?)?;
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn audit(source: &Source, json: bool, policy: &otabox::audit::Policy) -> Result<ExitCode> {
    let config = device_config(source)?;
    let runtime = Runtime::new(Some(config.cache_dir()))?;
    let mut audits = audit_dir(&runtime, &config.paths.handlers, &config.handlers).await?;
    policy.apply(&mut audits);
    if json {
        outln!("{}", serde_json::to_string_pretty(&audits)?)?;
    } else {
        out!("{}", render_text(&audits))?;
    }
    let clean = audits.iter().all(|a| a.count(Severity::Error) == 0);
    Ok(if clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn fleet(db: &Path, command: FleetCommand) -> Result<ExitCode> {
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

fn keygen(out: &Path, name: &str) -> Result<ExitCode> {
    use std::os::unix::fs::OpenOptionsExt;
    let (secret, public) = otabox::trust::signed::generate_key()?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let secret_path = out.join(format!("{name}.key"));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&secret_path)
        .with_context(|| {
            format!(
                "cannot create {} (it must not exist yet)",
                secret_path.display()
            )
        })?;
    std::io::Write::write_all(&mut file, format!("{secret}\n").as_bytes())?;
    std::fs::write(out.join(format!("{name}.pub")), format!("{public}\n"))?;
    outln!("{public}")?;
    Ok(ExitCode::SUCCESS)
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} does not parse", path.display()))
}

fn sign(
    keys: &[PathBuf],
    file: &Path,
    root_next: bool,
    sequence: Option<u64>,
    device: Option<String>,
    group: Option<String>,
    valid_for: u64,
) -> Result<ExitCode> {
    use otabox::trust::signed;
    let keys = keys
        .iter()
        .map(|k| {
            signed::signing_key(
                &std::fs::read_to_string(k)
                    .with_context(|| format!("cannot read {}", k.display()))?,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let output = if root_next {
        let next: signed::Root = read_json(file)?;
        next.check()?;
        serde_json::to_value(signed::sign(&next, &keys)?)?
    } else {
        let mut desired: otabox::shadow::DesiredState = read_json(file)?;
        anyhow::ensure!(
            desired.signed_manifest.is_none(),
            "{} is already signed",
            file.display()
        );
        anyhow::ensure!(
            device.is_some() || group.is_some(),
            "give --device or --group: a signed manifest names its target"
        );
        let now = otabox::clock::now_secs();
        let target = signed::Target { device, group };
        let sequence = sequence.context("--sequence is required")?;
        let manifest = signed::describe(&desired, sequence, target, now, now + valid_for)?;
        desired.signed_manifest = Some(serde_json::to_value(signed::sign(&manifest, &keys)?)?);
        serde_json::to_value(&desired)?
    };
    outln!("{}", serde_json::to_string_pretty(&output)?)?;
    Ok(ExitCode::SUCCESS)
}

fn verify(
    root: &Path,
    file: &Path,
    rotation: bool,
    device: Option<&str>,
    groups: &[String],
    last_sequence: u64,
) -> Result<ExitCode> {
    use otabox::trust::signed;
    let root: signed::Root = read_json(root)?;
    let result = if rotation {
        let next: signed::Signed<signed::Root> = read_json(file)?;
        root.rotate(&next).map(|r| {
            format!(
                "rotation to root version {} ({} of {} keys) is valid",
                r.version,
                r.threshold,
                r.keys.len()
            )
        })
    } else {
        let desired: otabox::shadow::DesiredState = read_json(file)?;
        anyhow::ensure!(
            desired.signed_manifest.is_some(),
            "{} is not signed",
            file.display()
        );
        let verifier = signed::Verifier {
            root: &root,
            device: device.unwrap_or_default(),
            groups,
            last_sequence,
            now: otabox::clock::now_secs(),
        };
        verifier.verify_deployment(&desired).map(|v| {
            let m = &v.manifest;
            let rotated = v.rotated.map_or(String::new(), |r| {
                format!(
                    " under root version {} (rotated by the deployment)",
                    r.version
                )
            });
            format!(
                "valid: job {} sequence {}, signed by {} key(s){rotated}, expires {}",
                m.signed.job_id,
                m.signed.sequence,
                m.signatures.len(),
                otabox::clock::rfc3339(m.signed.expires)
            )
        })
    };
    match result {
        Ok(text) => {
            outln!("{text}")?;
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "refused: {e:#}");
            Ok(ExitCode::FAILURE)
        }
    }
}

async fn demo(dir: Option<PathBuf>, keep: bool) -> Result<ExitCode> {
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
