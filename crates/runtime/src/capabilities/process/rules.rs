//! Command rules: which programs a handler may run, with which arguments
//! and environment variables.

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use super::identity::{self, CapSet, RunAs};

/// One `[[commands]]` entry of a handler manifest.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CommandRule {
    /// The program, compared exactly with what the handler asks to run. A
    /// bare name is looked up in the agent's fixed `PATH`.
    pub program: String,
    /// Argument patterns: a literal matches itself, `*` any one argument, a
    /// trailing `**` any number of remaining arguments (zero included),
    /// `{payload}` one `{payload:NAME}` placeholder, `{config:KEY}` the
    /// string at `KEY` (dotted) of the handler's device `config`.
    #[serde(default)]
    pub args: Vec<String>,
    /// Environment variables the handler may set: `NAME` (any value) or
    /// `NAME=VALUE` (only that value; `VALUE` may be `{config:KEY}`).
    #[serde(default)]
    pub env: Vec<String>,
    /// Argument patterns refused even when `args` match: case-insensitive,
    /// `*` any characters; words separated by spaces match consecutive
    /// arguments (`"--network host"`). The device may lift one with
    /// `allow_args`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny_args: Vec<String>,
    /// The user to run as (name or uid); default: the agent's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The group to run as (name or gid); default: the user's primary group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Capabilities the program keeps: `["all"]` or names (`net_admin`);
    /// default none (an empty bounding set).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub capabilities: Vec<String>,
    /// Processes the program leaves behind when it exits normally keep
    /// running (podman starts its containers' `conmon` so); at the time
    /// limit, or when the call ends early, they are killed all the same.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keep_running: bool,
    /// `user`/`group` resolved on this device (set when granted).
    #[serde(skip)]
    pub run_as: Option<RunAs>,
}

/// An argument pattern, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArgPattern<'a> {
    /// Exactly this argument.
    Exact(&'a str),
    /// Any one argument.
    One,
    /// Any remaining arguments.
    Rest,
    /// One `{payload:NAME}` placeholder, which the host replaces with the
    /// verified payload.
    Payload,
    /// A value of the device config, not resolved (the rule is not granted).
    Config(&'a str),
}

/// The key of a `{config:KEY}` pattern or value.
pub(crate) fn config_key(text: &str) -> Option<&str> {
    text.strip_prefix("{config:")?.strip_suffix('}')
}

/// Whether `arg` is one `{payload:NAME}` placeholder.
fn is_payload_placeholder(arg: &str) -> bool {
    arg.strip_prefix("{payload:")
        .and_then(|rest| rest.strip_suffix('}'))
        .is_some_and(|name| !name.is_empty() && !name.contains(['{', '}']))
}

/// Why no rule allowed a command; the text goes back to the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial(pub String);

impl std::fmt::Display for Denial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl CommandRule {
    /// The parsed argument patterns.
    pub fn patterns(&self) -> impl Iterator<Item = ArgPattern<'_>> {
        self.args.iter().map(|a| match a.as_str() {
            "*" => ArgPattern::One,
            "**" => ArgPattern::Rest,
            "{payload}" => ArgPattern::Payload,
            s => config_key(s).map_or(ArgPattern::Exact(s), ArgPattern::Config),
        })
    }

    /// Checks the rule itself: a program, `**` only last, sane env names.
    pub fn check(&self) -> Result<()> {
        if self.program.is_empty() || self.program.contains('\0') {
            bail!("`program` must be a non-empty program name or path");
        }
        if self.program.contains('/') && !self.program.starts_with('/') {
            bail!(
                "`program` {:?} must be absolute or a bare name",
                self.program
            );
        }
        if let Some(pos) = self.args.iter().position(|a| a == "**")
            && pos + 1 != self.args.len()
        {
            bail!("`args`: `**` may only be the last pattern");
        }
        for entry in &self.env {
            let name = entry.split_once('=').map_or(entry.as_str(), |(n, _)| n);
            if !is_env_name(name) || FORBIDDEN_ENV.contains(&name) {
                bail!("`env`: {name:?} may not be granted");
            }
        }
        if self
            .deny_args
            .iter()
            .any(|d| d.split_whitespace().next().is_none())
        {
            bail!("`deny_args`: a pattern must not be empty");
        }
        CapSet::parse(&self.capabilities).context("`capabilities`")?;
        for what in [&self.user, &self.group].into_iter().flatten() {
            if what.is_empty() || what.contains('\0') {
                bail!("`user`/`group` must be a name or a numeric id");
            }
        }
        Ok(())
    }

    /// The capabilities the program keeps (checked at load).
    pub fn keeps(&self) -> CapSet {
        CapSet::parse(&self.capabilities).unwrap_or_default()
    }

    /// The rule as granted on a device: `{config:KEY}` replaced by the
    /// handler config's values (`None` when one is not set: the rule is not
    /// granted), deny patterns lifted by `allowed`, `user`/`group` resolved.
    pub fn for_device(
        &self,
        config: Option<&toml::Table>,
        allowed: &[String],
    ) -> Result<Option<CommandRule>> {
        let mut rule = self.clone();
        for arg in &mut rule.args {
            if let Some(key) = config_key(arg) {
                let Some(value) = config_value(config, key) else {
                    return Ok(None);
                };
                *arg = value;
            }
        }
        // A variable pinned to a config value the device does not set is
        // not granted.
        rule.env.retain_mut(|entry| {
            let Some((name, key)) = entry
                .split_once('=')
                .and_then(|(n, v)| Some((n, config_key(v)?)))
            else {
                return true;
            };
            match config_value(config, key) {
                Some(value) => {
                    *entry = format!("{name}={value}");
                    true
                }
                None => false,
            }
        });
        for lifted in allowed {
            let Some(pos) = rule.deny_args.iter().position(|d| d == lifted) else {
                bail!(
                    "`allow_args` lifts {lifted:?} for {}, which none of its rules denies",
                    self.program
                );
            };
            rule.deny_args.remove(pos);
        }
        rule.run_as = identity::resolve(self.user.as_deref(), self.group.as_deref())
            .with_context(|| format!("command rule for {}", self.program))?;
        Ok(Some(rule))
    }

    /// The first deny pattern some arguments match.
    pub fn denied_by(&self, args: &[String]) -> Option<&str> {
        self.deny_args
            .iter()
            .find(|pattern| {
                let words: Vec<&str> = pattern.split_whitespace().collect();
                !words.is_empty()
                    && args
                        .windows(words.len())
                        .any(|w| w.iter().zip(&words).all(|(a, p)| glob_match(p, a)))
            })
            .map(String::as_str)
    }

    /// Whether the handler may set `name` to `value`.
    fn allows_env(&self, name: &str, value: &str) -> bool {
        self.env.iter().any(|entry| match entry.split_once('=') {
            Some((n, v)) => n == name && v == value,
            None => entry == name,
        })
    }

    /// Whether `args` match this rule's patterns.
    pub fn matches_args(&self, args: &[String]) -> bool {
        let mut given = args.iter();
        for pattern in self.patterns() {
            match pattern {
                ArgPattern::Rest => return true,
                ArgPattern::One => {
                    if given.next().is_none() {
                        return false;
                    }
                }
                ArgPattern::Exact(want) => {
                    if given.next().map(String::as_str) != Some(want) {
                        return false;
                    }
                }
                ArgPattern::Payload => {
                    if !given.next().is_some_and(|a| is_payload_placeholder(a)) {
                        return false;
                    }
                }
                ArgPattern::Config(_) => return false,
            }
        }
        given.next().is_none()
    }
}

/// Variables no rule may hand to a guest: they change what runs.
const FORBIDDEN_ENV: &[&str] = &[
    "PATH",
    "LD_PRELOAD",
    "LD_LIBRARY_PATH",
    "LD_AUDIT",
    "IFS",
    "BASH_ENV",
    "ENV",
];

/// The string at dotted `key` of the handler's device config.
fn config_value(config: Option<&toml::Table>, key: &str) -> Option<String> {
    let mut parts = key.split('.');
    let mut value = config?.get(parts.next()?)?;
    for part in parts {
        value = value.as_table()?.get(part)?;
    }
    value.as_str().map(str::to_string)
}

/// Case-insensitive match of `text` against `pattern`, where `*` matches any
/// run of characters.
fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.to_lowercase(), text.to_lowercase());
    let mut parts = p.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = t.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

fn is_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Finds a rule that allows `program args` with `env` names, or says why
/// none does.
pub fn authorize<'a>(
    rules: &'a [CommandRule],
    program: &str,
    args: &[String],
    env: &[(String, String)],
) -> Result<&'a CommandRule, Denial> {
    let for_program: Vec<&CommandRule> = rules.iter().filter(|r| r.program == program).collect();
    if for_program.is_empty() {
        return Err(Denial(format!(
            "program {program:?} is not declared in the handler's command rules"
        )));
    }
    let Some(rule) = for_program.iter().find(|r| r.matches_args(args)) else {
        return Err(Denial(format!(
            "arguments {args:?} of {program:?} match none of the declared patterns {:?}",
            for_program.iter().map(|r| &r.args).collect::<Vec<_>>()
        )));
    };
    if let Some(pattern) = rule.denied_by(args) {
        return Err(Denial(format!(
            "arguments {args:?} of {program:?} match the refused pattern {pattern:?}"
        )));
    }
    if let Some((name, _)) = env
        .iter()
        .find(|(name, value)| !rule.allows_env(name, value))
    {
        return Err(Denial(format!(
            "environment variable {name:?} (or its value) is not allowed for {program:?}"
        )));
    }
    Ok(rule)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(program: &str, args: &[&str]) -> CommandRule {
        CommandRule {
            program: program.into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            env: vec![],
            deny_args: vec![],
            user: None,
            group: None,
            capabilities: vec![],
            keep_running: false,
            run_as: None,
        }
    }

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn exact_one_and_rest_patterns() {
        let r = rule("/usr/bin/apt-get", &["install", "*", "**"]);
        assert!(r.matches_args(&args(&["install", "-y"])));
        assert!(r.matches_args(&args(&["install", "-y", "a=1", "b-"])));
        assert!(!r.matches_args(&args(&["install"])));
        assert!(!r.matches_args(&args(&["remove", "-y"])));
        let exact = rule("/bin/true", &[]);
        assert!(exact.matches_args(&[]));
        assert!(!exact.matches_args(&args(&["x"])));
        let one = rule("/bin/echo", &["*"]);
        assert!(one.matches_args(&args(&["hi"])));
        assert!(!one.matches_args(&args(&["hi", "there"])));
    }

    #[test]
    fn authorize_names_what_is_wrong() {
        let mut r = rule("/usr/bin/touch", &["/tmp/ok"]);
        r.env = vec!["LANG".into()];
        let rules = [r];
        assert!(authorize(&rules, "/usr/bin/touch", &args(&["/tmp/ok"]), &[]).is_ok());
        let e = authorize(&rules, "/bin/sh", &args(&["-c", "x"]), &[]).unwrap_err();
        assert!(e.0.contains("not declared"), "{e}");
        let e = authorize(&rules, "/usr/bin/touch", &args(&["/etc/x"]), &[]).unwrap_err();
        assert!(e.0.contains("match none"), "{e}");
        let e = authorize(
            &rules,
            "/usr/bin/touch",
            &args(&["/tmp/ok"]),
            &[("LD_PRELOAD".into(), "x".into())],
        )
        .unwrap_err();
        assert!(e.0.contains("LD_PRELOAD"), "{e}");
    }

    #[test]
    fn rules_are_checked() {
        assert!(rule("/bin/x", &["**", "a"]).check().is_err());
        assert!(rule("bin/x", &[]).check().is_err());
        assert!(rule("apt-get", &["**"]).check().is_ok());
        let mut r = rule("/bin/x", &[]);
        r.env = vec!["LD_PRELOAD".into()];
        assert!(r.check().is_err());
    }

    #[test]
    fn payload_config_and_deny_patterns() {
        let mut r = rule("/usr/bin/swupdate", &["-i", "{payload}", "**"]);
        assert!(r.matches_args(&args(&["-i", "{payload:b.swu}", "-v"])));
        assert!(!r.matches_args(&args(&["-i", "/etc/shadow"])));
        assert!(!r.matches_args(&args(&["-i", "{payload:}"])));
        r.deny_args = vec!["-P*".into(), "--network host".into(), "*pre-invoke*".into()];
        assert_eq!(r.denied_by(&args(&["-i", "x", "-p", "y"])), Some("-P*"));
        assert_eq!(
            r.denied_by(&args(&["--network", "HOST"])),
            Some("--network host")
        );
        assert_eq!(r.denied_by(&args(&["--network", "none", "host"])), None);
        assert_eq!(
            r.denied_by(&args(&["-o", "APT::Update::Pre-Invoke::=touch /x"])),
            Some("*pre-invoke*")
        );
        assert!(glob_match("a*b*c", "aXbYc") && !glob_match("a*b*c", "aXbY"));
        assert!(glob_match("*", "") && glob_match("x", "X") && !glob_match("x", "xy"));
    }

    #[test]
    fn device_config_pins_arguments_and_values() {
        let mut r = rule(
            "/usr/bin/grub-editenv",
            &["{config:bootloader.env}", "list"],
        );
        r.env = vec!["APT_CONFIG={config:apt_config}".into(), "LANG".into()];
        r.deny_args = vec!["--x".into()];
        let config: toml::Table =
            toml::from_str("apt_config = \"/a.conf\"\nbootloader = { env = \"/boot/env\" }\n")
                .expect("toml");
        let granted = r
            .for_device(Some(&config), &["--x".into()])
            .expect("resolves")
            .expect("granted");
        assert_eq!(granted.args, ["/boot/env", "list"]);
        assert!(
            granted.allows_env("APT_CONFIG", "/a.conf") && !granted.allows_env("APT_CONFIG", "/b")
        );
        assert!(granted.allows_env("LANG", "anything") && granted.deny_args.is_empty());
        assert_eq!(
            r.for_device(None, &[]).expect("no config"),
            None,
            "unset key: not granted"
        );
        assert!(!r.matches_args(&args(&["{config:bootloader.env}", "list"])));
        let err = r
            .for_device(Some(&config), &["--y".into()])
            .expect_err("unknown lift");
        assert!(format!("{err:#}").contains("allow_args"), "{err:#}");
        r.user = Some("no-such-user-otabox".into());
        let err = r.for_device(Some(&config), &[]).expect_err("unknown user");
        assert!(format!("{err:#}").contains("unknown user"), "{err:#}");
    }
}
