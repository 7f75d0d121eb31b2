//! A test guest that misbehaves on request, to prove the sandbox holds.
//!
//! `install` reads `{"action": ...}` from the manifest and does it:
//! `loop` spins forever, `alloc` allocates until memory runs out, `exec` runs
//! `program` with `args` (and `env`) and then computes for `busy_after_ms`, `read`/`write`/`list` touch `path`,
//! `checkpoint` stores `value`, `payload` reads the payload `name`, `print`
//! writes `text` to stdout and stderr `times` times, `connect` opens a TCP
//! connection to `address` and sends `hello`, `resolve` looks up `name`,
//! `status` fails with a message of `bytes` bytes (repeating `text`) and
//! `details` details, `log` logs `text` `times` times, `recurse` recurses
//! until the (`shadow`) stack overflows. `validate`
//! answers a `plan` manifest with `criteria_bytes` of installed criteria and
//! `warnings` warnings; `inventory` lists `items` items when the device
//! config asks for them. Results come back as `skipped(text)`, host errors
//! as `failed` with the error text.

use otabox_sdk::prelude::*;
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
enum Action {
    Loop,
    Alloc,
    /// Then keeps computing for `busy_after_ms`, whatever the result.
    Exec {
        program: String,
        args: Vec<String>,
        #[serde(default)]
        env: Vec<(String, String)>,
        #[serde(default)]
        busy_after_ms: u64,
    },
    Read {
        path: String,
    },
    Write {
        path: String,
    },
    List {
        path: String,
    },
    Checkpoint {
        key: String,
        value: String,
    },
    Payload {
        name: String,
    },
    Print {
        text: String,
        times: usize,
    },
    Connect {
        address: String,
    },
    /// Counts applies: `apply` waits `delay_ms`, then appends a line to
    /// `path`; installed once `path` has a line; rollback has nothing to undo.
    Count {
        path: String,
        #[serde(default)]
        delay_ms: u64,
    },
    /// Waits up to `max_ms` for cancel-requested, then returns cancelled
    /// (or skipped when it never came).
    WaitCancel {
        max_ms: u64,
    },
    /// `apply` asks for a reboot (`immediate`, `deferred`) or an agent
    /// `restart`; `verify` appends a line to `marker`; installed once it has.
    Reboot {
        mode: String,
        marker: String,
    },
    Resolve {
        name: String,
    },
    Status {
        text: String,
        bytes: usize,
        details: usize,
    },
    Log {
        text: String,
        times: usize,
    },
    Recurse {
        shadow: bool,
    },
    Plan {
        criteria_bytes: usize,
        warnings: usize,
    },
    Ok,
}

/// The device config of the hostile guest: how many inventory items to
/// list, each with a name of `name_bytes` bytes.
#[derive(Deserialize, Default)]
struct Config {
    #[serde(default)]
    items: usize,
    #[serde(default)]
    name_bytes: usize,
}

/// Any config parses: what is not a [`Config`] lists nothing.
impl FromJson for Config {
    fn parse(json: &str) -> Result<Self, String> {
        Ok(serde_json::from_str(json).unwrap_or_default())
    }
}

struct Hostile;

impl Handler for Hostile {
    type Manifest = ();
    type Config = Config;

    fn describe() -> Description {
        Description::new(
            "hostile",
            "0.0.0",
            ["otabox-test/hostile:1", "otabox-test/counter:1"],
        )
        .with_rollback()
    }

    fn is_installed(job: &Job<Self>) -> Result<bool, Status> {
        match job.step.manifest::<Action>()? {
            Action::Count { path, .. } | Action::Reboot { marker: path, .. } => {
                Ok(std::fs::read_to_string(path).is_ok_and(|s| !s.is_empty()))
            }
            _ => Ok(false),
        }
    }

    fn apply(job: &Job<Self>) -> Result<Outcome, Status> {
        Ok(match job.step.manifest::<Action>() {
            Ok(Action::Count { path, delay_ms }) => {
                use std::io::Write;
                std::thread::sleep(std::time::Duration::from_millis(delay_ms));
                let appended = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .and_then(|mut f| f.write_all(b"applied\n").and_then(|_| f.sync_all()));
                report(
                    appended
                        .map(|_| "applied".to_string())
                        .map_err(|e| e.to_string()),
                )
            }
            Ok(Action::Reboot { mode, .. }) => match mode.as_str() {
                "immediate" => Outcome::RebootRequired(RebootMode::Immediate),
                "deferred" => Outcome::RebootRequired(RebootMode::Deferred),
                _ => Outcome::RestartAgent,
            },
            _ => Outcome::Success,
        })
    }

    fn verify(job: &Job<Self>) -> Result<Outcome, Status> {
        Ok(match job.step.manifest::<Action>() {
            Ok(Action::Reboot { marker, .. }) => {
                use std::io::Write;
                let appended = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&marker)
                    .and_then(|mut f| f.write_all(b"verified\n").and_then(|_| f.sync_all()));
                match appended {
                    Ok(()) => Outcome::Success,
                    Err(e) => Outcome::Failed(Status::new(98, e.to_string())),
                }
            }
            _ => Outcome::Success,
        })
    }

    fn rollback(_job: &Job<Self>) -> Result<Outcome, Status> {
        Ok(Outcome::Success)
    }

    fn validate(job: &Job<Self>) -> Result<Plan, Status> {
        match job.step.manifest::<Action>() {
            Ok(Action::Plan {
                criteria_bytes,
                warnings,
            }) => {
                let mut plan = Plan::new("c".repeat(criteria_bytes));
                plan.warnings = (0..warnings)
                    .map(|i| format!("warning {i}\nforged"))
                    .collect();
                Ok(plan)
            }
            _ => Ok(Plan::new("hostile-0")),
        }
    }

    fn inventory(config: &Config) -> Result<Vec<InstalledItem>, Status> {
        Ok((0..config.items)
            .map(|i| InstalledItem {
                name: format!("{i}{}", "n".repeat(config.name_bytes)),
                version: "1\u{1b}[2J".into(),
                update_type: "otabox-test/hostile:1".into(),
                details: vec![("k".into(), "v\n".into()); 40],
            })
            .collect())
    }

    fn install(job: &Job<Self>) -> Result<Outcome, Status> {
        Ok(match job.step.manifest::<Action>() {
            Ok(action) => act(action),
            Err(status) => Outcome::Failed(status),
        })
    }
}

fn act(action: Action) -> Outcome {
    match action {
        Action::Loop => {
            let mut n: u64 = 0;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        Action::Alloc => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![0xA5; 1 << 20]);
                std::hint::black_box(&hoard);
            }
        }
        Action::Exec {
            program,
            args,
            env,
            busy_after_ms,
        } => {
            let mut cmd = Command::new(program).args(args);
            for (k, v) in env {
                cmd = cmd.env(k, v);
            }
            let result = cmd.run();
            let started = std::time::Instant::now();
            while started.elapsed() < std::time::Duration::from_millis(busy_after_ms) {
                std::hint::spin_loop();
            }
            report(result.map(|out| format!("exit={:?} stdout={}", out.code(), out.stdout())))
        }
        Action::Read { path } => report(std::fs::read_to_string(&path).map_err(|e| e.to_string())),
        Action::Write { path } => report(
            std::fs::write(&path, b"written by a guest")
                .map(|_| "written".to_string())
                .map_err(|e| e.to_string()),
        ),
        Action::List { path } => report(
            std::fs::read_dir(&path)
                .map(|dir| {
                    dir.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .map_err(|e| e.to_string()),
        ),
        Action::Checkpoint { key, value } => report(
            checkpoint::set(&key, value.as_bytes())
                .and_then(|_| checkpoint::get(&key))
                .map(|v| String::from_utf8_lossy(&v.unwrap_or_default()).into_owned()),
        ),
        Action::Payload { name } => report(
            Payload::open(&name)
                .and_then(|p| p.read_at(0, 64))
                .map(|b| String::from_utf8_lossy(&b).into_owned()),
        ),
        Action::Print { text, times } => {
            for _ in 0..times {
                println!("{text}");
                eprintln!("{text}");
            }
            Outcome::Success
        }
        Action::Connect { address } => report(
            std::net::TcpStream::connect(&address)
                .and_then(|mut stream| std::io::Write::write_all(&mut stream, b"hello"))
                .map(|_| "connected".to_string()),
        ),
        Action::WaitCancel { max_ms } => {
            let started = std::time::Instant::now();
            while started.elapsed().as_millis() < u128::from(max_ms) {
                if cancel_requested() {
                    return Outcome::Cancelled;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Outcome::Skipped("never cancelled".into())
        }
        Action::Resolve { name } => report(
            std::net::ToSocketAddrs::to_socket_addrs(&(name.as_str(), 80)).map(|addrs| {
                addrs
                    .map(|a| a.ip().to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            }),
        ),
        Action::Status {
            text,
            bytes,
            details,
        } => {
            let message: String = text.chars().cycle().take(bytes).collect();
            let mut status = Status::new(97, message);
            status.details = (0..details)
                .map(|i| (format!("key-{i}"), text.clone()))
                .collect();
            Outcome::Failed(status)
        }
        Action::Log { text, times } => {
            for _ in 0..times {
                otabox_sdk::log(LogLevel::Info, &text);
            }
            Outcome::Success
        }
        Action::Recurse { shadow } => Outcome::Skipped(format!("depth {}", recurse(shadow, 0))),
        Action::Count { .. } | Action::Reboot { .. } | Action::Plan { .. } | Action::Ok => {
            Outcome::Success
        }
    }
}

/// Recurses until the stack overflows: with `shadow`, each frame keeps 4
/// KiB in the shadow stack of linear memory (which then wraps below
/// address 0); without, frames live only on the engine's call stack.
#[allow(unconditional_recursion)]
fn recurse(shadow: bool, depth: u64) -> u64 {
    if !shadow {
        return 1 + std::hint::black_box(recurse(false, std::hint::black_box(depth) + 1));
    }
    let mut local = [0u8; 4096];
    local[0] = depth as u8;
    std::hint::black_box(&mut local);
    1 + recurse(true, depth + 1) + u64::from(local[1])
}

fn report<E: std::fmt::Display>(result: Result<String, E>) -> Outcome {
    match result {
        Ok(text) => Outcome::Skipped(text),
        Err(e) => Outcome::Failed(Status::new(99, e.to_string())),
    }
}

export_handler!(Hostile);
