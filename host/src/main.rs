//! The `otabox` command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use otabox::audit::{Severity, audit_dir, render_text};
use otabox::config::DeviceConfig;
use otabox::runtime::{HandlerSet, Runtime};

/// Default device configuration file.
const DEFAULT_CONFIG: &str = "/etc/otabox/device.toml";

/// otabox: over-the-air updates whose update types are sandboxed
/// WebAssembly handlers.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Log filter, such as `info`, `debug` or `otabox=debug,handler=trace`
    /// (default: `info` for `run`, `warn` otherwise).
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

/// Where handlers and grants come from.
#[derive(clap::Args)]
struct Source {
    /// Device configuration (handler directory and per-handler grants).
    #[arg(long, short, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    /// Handler directory to use instead of the config's (without a config
    /// file, every handler gets what it declares).
    #[arg(long)]
    dir: Option<PathBuf>,
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
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_log = if matches!(cli.command, Command::Run { .. }) { "info" } else { "warn" };
    let filter = cli.log.as_deref().unwrap_or(default_log);
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| default_log.into()))
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> Result<ExitCode> {
    match command {
        Command::Handlers { command: HandlersCommand::List { source, json } } => list(&source, json).await,
        Command::Handlers { command: HandlersCommand::Audit { source, json } } => audit(&source, json).await,
        Command::Demo { dir, keep } => demo(dir, keep).await,
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
        DeviceConfig::load(&source.config).with_context(|| "pass --config FILE, or --dir DIR for a bare handler directory")?
    } else {
        let mut config = DeviceConfig::default();
        config.paths.cache = Some(std::env::temp_dir().join("otabox-cache"));
        config
    };
    if let Some(dir) = &source.dir {
        config.paths.handlers = dir.clone();
    }
    Ok(config)
}

async fn list(source: &Source, json: bool) -> Result<ExitCode> {
    let config = device_config(source)?;
    let runtime = Runtime::new(Some(config.cache_dir()))?;
    let set = runtime.load_dir(&config.paths.handlers, &config.handlers).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&list_json(&set))?);
    } else {
        print_list(&set, &config.paths.handlers);
    }
    Ok(ExitCode::SUCCESS)
}

fn list_json(set: &HandlerSet) -> serde_json::Value {
    let loaded = set.handlers.iter().map(|h| {
        serde_json::json!({
            "name": h.name, "status": "loaded", "file": h.wasm_path, "sha256": h.sha256,
            "version": h.description.version, "contract": h.description.contract,
            "update_types": h.manifest.handler.update_types, "supports_rollback": h.description.supports_rollback,
            "grants": &*h.grants, "cache": h.cache,
        })
    });
    let refused = set.refused.iter().map(|r| {
        serde_json::json!({"name": r.name, "status": "refused", "manifest": r.manifest, "error": format!("{:#}", r.error)})
    });
    let disabled = set.disabled.iter().map(|n| serde_json::json!({"name": n, "status": "disabled"}));
    serde_json::Value::Array(loaded.chain(refused).chain(disabled).collect())
}

fn print_list(set: &HandlerSet, dir: &Path) {
    println!("{:<12} {:<9} {:<9} {:<14} {:<30} FILE", "NAME", "STATUS", "VERSION", "SHA256", "UPDATE TYPES");
    for h in &set.handlers {
        println!(
            "{:<12} {:<9} {:<9} {:<14} {:<30} {}",
            h.name,
            "loaded",
            h.description.version,
            &h.sha256[..12],
            h.manifest.handler.update_types.join(","),
            h.wasm_path.display()
        );
    }
    for r in &set.refused {
        println!("{:<12} {:<9} {:#}", r.name, "refused", r.error);
    }
    for name in &set.disabled {
        println!("{name:<12} disabled");
    }
    if set.handlers.is_empty() && set.refused.is_empty() && set.disabled.is_empty() {
        println!("(no handlers in {})", dir.display());
    }
}

async fn audit(source: &Source, json: bool) -> Result<ExitCode> {
    let config = device_config(source)?;
    let runtime = Runtime::new(Some(config.cache_dir()))?;
    let audits = audit_dir(&runtime, &config.paths.handlers, &config.handlers).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&audits)?);
    } else {
        print!("{}", render_text(&audits));
    }
    let clean = audits.iter().all(|a| a.count(Severity::Error) == 0);
    Ok(if clean { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

async fn demo(dir: Option<PathBuf>, keep: bool) -> Result<ExitCode> {
    let root = match dir {
        Some(dir) => dir,
        None => std::env::temp_dir().join(format!("otabox-demo-{}", std::process::id())),
    };
    let outcome = otabox::demo::run(&root).await;
    if keep {
        println!("\nkept {}", root.display());
    } else {
        let _ = std::fs::remove_dir_all(&root);
    }
    outcome?;
    Ok(ExitCode::SUCCESS)
}
