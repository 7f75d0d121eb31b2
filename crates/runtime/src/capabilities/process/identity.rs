//! Who a command runs as: the user and group a rule names (resolved on
//! the device when the handler loads) and the Linux capabilities it keeps.

use std::ffi::CString;

use anyhow::{Context, Result, bail};

/// The Linux capabilities by number (`capabilities(7)`), lowercase without
/// the `cap_` prefix.
const CAPABILITY_NAMES: &[&str] = &[
    "chown",
    "dac_override",
    "dac_read_search",
    "fowner",
    "fsetid",
    "kill",
    "setgid",
    "setuid",
    "setpcap",
    "linux_immutable",
    "net_bind_service",
    "net_broadcast",
    "net_admin",
    "net_raw",
    "ipc_lock",
    "ipc_owner",
    "sys_module",
    "sys_rawio",
    "sys_chroot",
    "sys_ptrace",
    "sys_pacct",
    "sys_admin",
    "sys_boot",
    "sys_nice",
    "sys_resource",
    "sys_time",
    "sys_tty_config",
    "mknod",
    "lease",
    "audit_write",
    "audit_control",
    "setfcap",
    "mac_override",
    "mac_admin",
    "syslog",
    "wake_alarm",
    "block_suspend",
    "audit_read",
    "perfmon",
    "bpf",
    "checkpoint_restore",
];

/// A set of capabilities as a bit mask (bit n: capability n).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CapSet(pub u64);

impl CapSet {
    /// Every capability.
    pub const ALL: CapSet = CapSet(u64::MAX);

    /// Parses `["all"]` or names such as `net_admin` / `CAP_NET_ADMIN`;
    /// an unknown name is an error naming it.
    pub fn parse(names: &[String]) -> Result<Self> {
        let mut mask = 0u64;
        for name in names {
            let lower = name.to_ascii_lowercase();
            if lower == "all" {
                return Ok(Self::ALL);
            }
            let bare = lower.strip_prefix("cap_").unwrap_or(&lower);
            let bit = CAPABILITY_NAMES
                .iter()
                .position(|n| *n == bare)
                .with_context(|| format!("unknown capability {name:?}"))?;
            mask |= 1 << bit;
        }
        Ok(Self(mask))
    }

    /// Whether capability number `cap` is in the set.
    pub fn contains(self, cap: u32) -> bool {
        cap < 64 && self.0 & (1 << cap) != 0
    }

    /// Whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

/// The resolved identity of a rule with `user` or `group`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    /// User id (the agent's own when the rule names only a group).
    pub uid: Option<u32>,
    /// Group id.
    pub gid: u32,
    /// Supplementary groups (the user's, or just `gid`).
    pub groups: Vec<u32>,
}

/// Resolves `user` and `group` (names or numeric ids) on this device; an
/// unknown name is an error naming it. `None` when neither is given.
pub fn resolve(user: Option<&str>, group: Option<&str>) -> Result<Option<RunAs>> {
    let user = user.map(lookup_user).transpose()?;
    let group = group.map(lookup_group).transpose()?;
    Ok(match (user, group) {
        (None, None) => None,
        (Some((uid, primary, name)), group) => {
            let gid = group.unwrap_or(primary);
            let mut groups = if group.is_some() {
                vec![gid]
            } else {
                group_list(&name, primary)
            };
            if !groups.contains(&gid) {
                groups.push(gid);
            }
            Some(RunAs {
                uid: Some(uid),
                gid,
                groups,
            })
        }
        (None, Some(gid)) => Some(RunAs {
            uid: None,
            gid,
            groups: vec![gid],
        }),
    })
}

/// (uid, primary gid, name) of a user name or numeric uid.
fn lookup_user(user: &str) -> Result<(u32, u32, CString)> {
    let name = CString::new(user).context("user name with a NUL byte")?;
    let mut buf = vec![0u8; 16 << 10];
    // SAFETY: passwd is plain data; getpwnam_r/getpwuid_r write into `pwd`
    // and `buf` (of the length given) only, and set `found` to `&pwd` or null.
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        let rc = match user.parse::<u32>() {
            Ok(uid) => libc::getpwuid_r(
                uid,
                &mut pwd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut found,
            ),
            Err(_) => libc::getpwnam_r(
                name.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut found,
            ),
        };
        if rc != 0 || found.is_null() {
            bail!("unknown user {user:?} on this device");
        }
        let name = std::ffi::CStr::from_ptr(pwd.pw_name).to_owned();
        Ok((pwd.pw_uid, pwd.pw_gid, name))
    }
}

/// The gid of a group name or numeric gid.
fn lookup_group(group: &str) -> Result<u32> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    let name = CString::new(group).context("group name with a NUL byte")?;
    let mut buf = vec![0u8; 16 << 10];
    // SAFETY: as in `lookup_user`, with `group`.
    unsafe {
        let mut grp: libc::group = std::mem::zeroed();
        let mut found: *mut libc::group = std::ptr::null_mut();
        let rc = libc::getgrnam_r(
            name.as_ptr(),
            &mut grp,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut found,
        );
        if rc != 0 || found.is_null() {
            bail!("unknown group {group:?} on this device");
        }
        Ok(grp.gr_gid)
    }
}

/// The groups `name` belongs to (`getgrouplist`), at least `primary`.
fn group_list(name: &CString, primary: u32) -> Vec<u32> {
    let mut groups = vec![0 as libc::gid_t; 256];
    let mut count = groups.len() as libc::c_int;
    // SAFETY: `groups` has room for `count` entries; getgrouplist writes at
    // most that many and updates `count`.
    let rc = unsafe { libc::getgrouplist(name.as_ptr(), primary, groups.as_mut_ptr(), &mut count) };
    if rc < 0 {
        return vec![primary];
    }
    groups.truncate(usize::try_from(count).unwrap_or(0));
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_names_parse_with_or_without_prefix() {
        let caps = CapSet::parse(&["CAP_CHOWN".into(), "net_admin".into()]).expect("known");
        assert_eq!(caps, CapSet(1 | 1 << 12));
        assert_eq!(CapSet::parse(&["all".into()]).expect("all"), CapSet::ALL);
        let err = CapSet::parse(&["cap_rootkit".into()]).expect_err("unknown");
        assert!(format!("{err:#}").contains("cap_rootkit"), "{err:#}");
    }

    #[test]
    fn users_and_groups_resolve_or_are_named() {
        let nobody = resolve(Some("nobody"), None)
            .expect("nobody")
            .expect("some");
        assert_eq!(nobody.uid, Some(65534));
        assert_eq!(
            resolve(Some("0"), None).expect("uid 0").expect("some").uid,
            Some(0)
        );
        let err = resolve(Some("no-such-user-otabox"), None).expect_err("unknown");
        assert!(format!("{err:#}").contains("unknown user"), "{err:#}");
        let err = resolve(None, Some("no-such-group-otabox")).expect_err("unknown");
        assert!(format!("{err:#}").contains("unknown group"), "{err:#}");
        assert_eq!(resolve(None, None).expect("none"), None);
    }
}
