//! Command rules: which programs a handler may run, with which arguments
//! and environment variables.

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

/// One `[[commands]]` entry of a handler manifest.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CommandRule {
    /// The program, compared exactly with what the handler asks to run. A
    /// bare name is looked up in the agent's fixed `PATH`.
    pub program: String,
    /// Argument patterns: a literal matches itself, `*` any one argument, a
    /// trailing `**` any number of remaining arguments (zero included).
    #[serde(default)]
    pub args: Vec<String>,
    /// Names of environment variables the handler may set.
    #[serde(default)]
    pub env: Vec<String>,
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
            s => ArgPattern::Exact(s),
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
        for name in &self.env {
            if !is_env_name(name) || FORBIDDEN_ENV.contains(&name.as_str()) {
                bail!("`env`: {name:?} may not be granted");
            }
        }
        Ok(())
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
    if let Some((name, _)) = env.iter().find(|(name, _)| !rule.env.contains(name)) {
        return Err(Denial(format!(
            "environment variable {name:?} is not allowed for {program:?}"
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
}
