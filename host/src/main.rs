//! The `otabox` command line.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use otabox::audit::{Severity, audit_dirs, render_text};
use otabox::config::DeviceConfig;
use otabox::runtime::{HandlerSet, Runtime};
use otabox::{console, out, outln};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// The cloud side's commands (`replica`, `fleet`, `demo`): only in a build
/// with the `fleet` feature (the default; a device build leaves it out).
#[cfg(feature = "fleet")]
#[path = "cli/fleet.rs"]
mod fleet;

/// `handlers install` and `handlers remove`.
#[path = "cli/handlers.rs"]
mod handlers;

/// `otabox handlers precompile`.
#[path = "cli/precompile.rs"]
mod precompile;

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
    /// Log filter: a level (`error`, `warn`, `info`, `debug`, `trace`,
    /// `off`), and/or `target=level` pairs matching the start of a log
    /// target, comma-separated, such as `otabox=debug,handler=trace`
    /// (default: `info` for `run` and `replica`, `error` for `demo`, `warn`
    /// otherwise).
    #[arg(long, global = true, env = "OTABOX_LOG", value_parser = parse_log_filter)]
    log: Option<Targets>,
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
    #[cfg(feature = "fleet")]
    Replica {
        /// The replica's SQLite database (created when missing).
        #[arg(long)]
        db: PathBuf,
        #[command(flatten)]
        broker: fleet::BrokerArgs,
    },
    /// Operate a fleet through the replica's database.
    #[cfg(feature = "fleet")]
    Fleet {
        /// The replica's SQLite database (`register` and `otabox replica`
        /// create it; the other commands refuse a missing one).
        #[arg(long)]
        db: PathBuf,
        #[command(subcommand)]
        command: fleet::FleetCommand,
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
    /// Inspect, install and remove handlers.
    Handlers {
        #[command(subcommand)]
        command: HandlersCommand,
    },
    /// Walk through a whole update with the built-in file handler in a
    /// scratch directory (nothing outside it is touched).
    #[cfg(feature = "fleet")]
    Demo {
        /// Directory to run in (default: a new temporary directory).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Keep the directory afterwards.
        #[arg(long)]
        keep: bool,
    },
}

/// Where handlers and grants come from.
#[derive(clap::Args)]
struct Source {
    /// Device configuration (handler directories and per-handler grants).
    #[arg(long, short, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    /// Handler directory to use instead of the config's (without a config
    /// file, every handler gets what it declares, and checkpoints and the
    /// compiled-component cache live in `$XDG_STATE_HOME/otabox`, default
    /// `~/.local/state/otabox`).
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// What `handlers precompile --help` adds: the two builds and the artifacts.
const PRECOMPILE_HELP: &str =
    "A build with the compiler (the default) precompiles into its cache; the
Debian package's postinst runs `otabox handlers precompile --prune`. The
runtime-only build (no `compiler` feature) cannot compile: it loads
NAME.cwasm beside NAME.wasm, after checking its record NAME.cwasm.json
against the manifest's sha256 pin and its own engine hash (otabox version,
target, engine settings), and refuses a mismatch, naming both. There,
`handlers precompile` only checks the shipped artifacts.

On the build machine, for an arm64 board:
  otabox handlers precompile --dir handlers/ --target aarch64-unknown-linux-gnu
and for armhf (Pulley):
  otabox handlers precompile --dir handlers/ --target armv7-unknown-linux-gnueabihf
Targets other than this machine's need a build with the `all-targets`
feature (`cargo build -p otabox --features all-targets`).";

/// How a running agent takes a changed handler directory, shown by the
/// `handlers` commands' `--help`.
const RELOAD_HELP: &str = "Handler directories ([paths] handlers, in order): the packaged handlers
(/usr/lib/otabox/handlers) and the integrator's (/etc/otabox/handlers.d, the
last directory: install and remove work there). A handler name and each
update type belong to one handler: a second claim is refused, naming both
files.

A running agent keeps its handlers until SIGHUP (`systemctl reload otabox`,
or `kill -HUP PID`); install and remove send it when an agent runs on the
config's state directory. It reloads between jobs: a job in progress ends
with the handlers it started with, the next job uses the new set.";

#[derive(Subcommand)]
#[command(after_help = RELOAD_HELP)]
enum HandlersCommand {
    /// Load every handler and show its status, version, update types and
    /// file (so its directory).
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
    /// Compile every handler into the compiled-component cache (`[paths]
    /// cache`), so the agent's next start compiles nothing; only the sha256
    /// pin is checked. With --target (on a build machine), write artifacts
    /// for that target instead: NAME.cwasm and its record NAME.cwasm.json,
    /// bound to the wasm's sha256 and the target's engine hash, which a
    /// runtime-only agent loads from beside NAME.wasm. Exits 1 when a
    /// handler cannot be compiled.
    #[command(after_help = PRECOMPILE_HELP)]
    Precompile {
        #[command(flatten)]
        source: Source,
        /// Delete cache entries of handlers no longer in the directory.
        #[arg(long, conflicts_with_all = ["target", "out"])]
        prune: bool,
        /// Write artifacts for this target: a Rust target triple
        /// (aarch64-unknown-linux-gnu; 32-bit ARM triples mean Pulley, as
        /// their device build runs it) or a Pulley target (pulley32,
        /// pulley64). Default with --out: this build's own target.
        #[arg(long, value_name = "TRIPLE")]
        target: Option<String>,
        /// Where to write the artifacts (default with --target: beside each
        /// handler's wasm).
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
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
        /// The phase to call, or `step` for the whole step.
        #[arg(long, value_parser = phase_choice())]
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
    /// Install an integrator's handler (NAME.wasm and NAME.toml; the name
    /// is the manifest's file name) into the last handler directory, or
    /// replace the one of that name there: checks the manifest's sha256
    /// against the wasm, refuses a name or update type another handler
    /// holds, audits it against the device's grants (refusing on an audit
    /// error unless --force, and printing the findings), precompiles it
    /// into the cache and places both files atomically. A precompiled
    /// artifact beside the wasm (NAME.cwasm + NAME.cwasm.json, from
    /// `handlers precompile --target`) goes along once it matches the wasm
    /// and this agent's engine: the way onto a runtime-only device. Any
    /// failure leaves the directory as it was.
    #[command(after_help = RELOAD_HELP)]
    Install {
        #[command(flatten)]
        source: Source,
        /// The component.
        wasm: PathBuf,
        /// Its capability manifest, pinning the component's sha256.
        toml: PathBuf,
        /// Install despite audit errors.
        #[arg(long)]
        force: bool,
    },
    /// Remove an integrator's handler from the last handler directory,
    /// with its precompiled cache entry (a packaged one is refused: disable
    /// it with `[handlers.NAME] enabled = false`).
    #[command(after_help = RELOAD_HELP)]
    Remove {
        #[command(flatten)]
        source: Source,
        /// The handler's name.
        name: String,
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
        Command::Run { .. } => LevelFilter::INFO,
        #[cfg(feature = "fleet")]
        Command::Replica { .. } => LevelFilter::INFO,
        // The demo's printout is its interface; its services' warnings as it
        // shuts them down are noise.
        #[cfg(feature = "fleet")]
        Command::Demo { .. } => LevelFilter::ERROR,
        _ => LevelFilter::WARN,
    };
    let filter = cli
        .log
        .clone()
        .unwrap_or_else(|| Targets::new().with_default(default_log));
    let color = console::use_color(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(color)
                .with_writer(std::io::stderr),
        )
        .with(filter)
        .init();
}

/// `--log`/`OTABOX_LOG`: a bad filter is a usage error, not a silent default.
/// (A plain target filter, not `RUST_LOG`'s regular-expression one: the
/// regex engine would be a quarter of a megabyte of the device binary.)
/// A bare word must be a level: `debgu` would otherwise be read as a target
/// and turn every log off.
fn parse_log_filter(text: &str) -> Result<Targets, String> {
    const HINT: &str = "use a level (error, warn, info, debug, trace, off) and/or \
                        target=level pairs, comma-separated";
    for directive in text.split(',').filter(|d| !d.contains('=')) {
        if directive.trim().parse::<LevelFilter>().is_err() {
            return Err(format!("`{directive}` is not a level; {HINT}"));
        }
    }
    text.parse::<Targets>().map_err(|e| format!("{e}; {HINT}"))
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
                HandlersCommand::Precompile {
                    source,
                    prune,
                    target,
                    out,
                },
        } => {
            let config = device_config(&source)?;
            let handlers = config.paths.handlers.as_slice();
            if target.is_some() || out.is_some() {
                precompile::artifacts(handlers, target.as_deref(), out.as_deref())
            } else {
                precompile::run(handlers, config.cache_dir(), prune).await
            }
        }
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
        Command::Handlers {
            command:
                HandlersCommand::Install {
                    source,
                    wasm,
                    toml,
                    force,
                },
        } => handlers::install(&device_config(&source)?, &wasm, &toml, force).await,
        Command::Handlers {
            command: HandlersCommand::Remove { source, name },
        } => handlers::remove(&device_config(&source)?, &name),
        #[cfg(feature = "fleet")]
        Command::Demo { dir, keep } => fleet::demo(dir, keep).await,
        Command::Version => {
            outln!("otabox {}", env!("CARGO_PKG_VERSION"))?;
            Ok(ExitCode::SUCCESS)
        }
        #[cfg(feature = "fleet")]
        Command::Replica { db, broker } => {
            let mqtt = broker.into_section()?;
            otabox::replica::service::run(otabox::replica::service::ReplicaOptions { db, mqtt })
                .await?;
            Ok(ExitCode::SUCCESS)
        }
        #[cfg(feature = "fleet")]
        Command::Fleet { db, command } => fleet::fleet(&db, command).await,
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
        config.paths.handlers = otabox::config::HandlerDirs::one(dir.clone());
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
    let dirs = config.paths.handlers.as_slice();
    let set = runtime.load_dirs(dirs, &config.handlers).await?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&list_json(&set))?)?;
    } else {
        print_list(&set, dirs)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn list_json(set: &HandlerSet) -> serde_json::Value {
    let loaded = set.handlers.iter().map(|h| {
        serde_json::json!({
            "name": h.name, "status": "loaded", "file": h.wasm_path, "dir": h.manifest_path.parent(), "sha256": h.sha256,
            "version": h.description.version, "contract": h.contract,
            "update_types": h.manifest.handler.update_types, "supports_rollback": h.description.supports_rollback,
            "grants": &*h.grants, "cache": h.cache,
        })
    });
    let refused = set.refused.iter().map(|r| {
        serde_json::json!({"name": r.name, "status": "refused", "manifest": r.manifest, "dir": r.manifest.parent(), "error": format!("{:#}", r.error)})
    });
    let disabled = set
        .disabled
        .iter()
        .map(|n| serde_json::json!({"name": n, "status": "disabled"}));
    serde_json::Value::Array(loaded.chain(refused).chain(disabled).collect())
}

fn print_list(set: &HandlerSet, dirs: &[PathBuf]) -> Result<()> {
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
        let dirs: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
        outln!("(no handlers in {})", dirs.join(", "))?;
    }
    Ok(())
}

/// A manifest given as JSON text (starting with `{`) or as a file path.
/// The `--phase` values: every phase by name, and `step`.
fn phase_choice() -> impl clap::builder::TypedValueParser<Value = otabox::run_phase::PhaseChoice> {
    use clap::builder::TypedValueParser as _;
    clap::builder::PossibleValuesParser::new(otabox::run_phase::PhaseChoice::names())
        .try_map(|name| name.parse::<otabox::run_phase::PhaseChoice>())
}

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
    let manifest_path =
        otabox::runtime::dirs::find(config.paths.handlers.as_slice(), &config.handlers, name)?;
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
    let dirs = config.paths.handlers.as_slice();
    let mut audits = audit_dirs(&runtime, dirs, &config.handlers).await?;
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
