//! Keeps every process a command starts together so that all of them end
//! with the command, and starts it with no more privilege than its rule
//! grants.
//!
//! Each command runs in its own cgroup v2 (`cgroup.kill` ends it whole,
//! `pids.max` and `memory.max` bound it where those controllers are
//! available). Where no cgroup can be made, a per-command subreaper — a
//! forked copy of the agent that adopts every orphan of the command — stands
//! between the agent and the program; the agent then stops and kills every
//! descendant of it. Either way nothing the command started outlives it:
//! not when it exits normally, not at its time limit, not when the call is
//! dropped.
//!
//! In the child, before `exec`: join the cgroup (or fork the subreaper),
//! drop the capability bounding set to what the rule keeps, switch user and
//! group, set the kept capabilities as ambient for another user, and set
//! `no_new_privs`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};

use crate::capabilities::{CapSet, CommandIsolation, RunAs};

/// Most processes in one command's cgroup (where the pids controller is
/// available).
pub const PIDS_MAX: u32 = 4096;
/// Most memory of one command's cgroup (where the memory controller is
/// available).
pub const MEMORY_MAX: u64 = 1 << 30;

/// Who the program runs as: from the rule that allowed it.
#[derive(Debug, Clone, Default)]
pub struct Privileges {
    /// User and groups, when the rule names them.
    pub run_as: Option<RunAs>,
    /// Capabilities it keeps.
    pub keep: CapSet,
    /// Leave what it started running when it exits normally.
    pub keep_running: bool,
}

/// A started command and what holds its processes together.
pub struct Confined {
    kind: Kind,
    pid: Option<u32>,
    killed: bool,
    keep_running: bool,
}

enum Kind {
    Cgroup(Cgroup),
    Reaper(Option<File>),
}

/// Spawns `command` confined as `isolation` asks, with `privileges`.
pub fn spawn(
    command: &mut Command,
    privileges: &Privileges,
    isolation: CommandIsolation,
) -> io::Result<(Child, Confined)> {
    let cgroup = match isolation {
        CommandIsolation::Auto => Cgroup::create(),
        CommandIsolation::Subreaper => None,
    };
    let (kind, setup, status_write) = match cgroup {
        Some(cgroup) => {
            let setup = ChildSetup::new(privileges, Join::Cgroup(cgroup.procs.as_raw_fd()));
            (Kind::Cgroup(cgroup), setup, None)
        }
        None => {
            let (read, write) = status_pipe()?;
            let setup = ChildSetup::new(privileges, Join::Reaper(write.as_raw_fd()));
            (Kind::Reaper(Some(read)), setup, Some(write))
        }
    };
    // SAFETY: `ChildSetup::apply` makes only async-signal-safe system calls
    // on data prepared before the fork, and never allocates.
    unsafe {
        command.pre_exec(move || setup.apply());
    }
    let child = command.spawn();
    drop(status_write);
    let mut confined = Confined {
        kind,
        pid: None,
        killed: false,
        keep_running: privileges.keep_running,
    };
    let child = child?;
    confined.pid = child.id();
    Ok((child, confined))
}

impl Confined {
    /// Waits for the program itself to exit, then kills whatever it left
    /// behind.
    pub async fn wait(&mut self, child: &mut Child) -> io::Result<ExitStatus> {
        let status = match &mut self.kind {
            Kind::Cgroup(_) => child.wait().await,
            Kind::Reaper(pipe) => read_status(pipe.take()).await,
        };
        if self.keep_running {
            self.release();
        } else if self.kill_all() {
            tracing::warn!(
                pid = self.pid,
                "the command left processes behind; they were killed"
            );
        }
        if matches!(self.kind, Kind::Reaper(_)) {
            // Reap the subreaper, killed above.
            let _ = child.wait().await;
        }
        status
    }

    /// Kills every process of the command (once); whether any besides the
    /// program (and the subreaper) was still there.
    pub fn kill_all(&mut self) -> bool {
        if self.killed {
            return false;
        }
        self.killed = true;
        match &self.kind {
            // An empty cgroup stays empty: only its members can add to it.
            Kind::Cgroup(cgroup) => {
                cgroup.populated() && {
                    cgroup.kill();
                    true
                }
            }
            Kind::Reaper(_) => self
                .pid
                .and_then(|p| libc::pid_t::try_from(p).ok())
                .is_some_and(|pid| kill_tree(pid) > 0),
        }
    }

    /// Lets what the program left behind go on running: out of its cgroup
    /// (into the agent's), or orphaned by killing the subreaper alone.
    fn release(&mut self) {
        self.killed = true;
        match &self.kind {
            Kind::Cgroup(cgroup) => cgroup.release(),
            Kind::Reaper(_) => {
                if let Some(pid) = self.pid.and_then(|p| libc::pid_t::try_from(p).ok()) {
                    // SAFETY: kill only signals the command's own subreaper.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
    }

    /// Whether the command runs in its own cgroup (else: the subreaper).
    pub fn in_cgroup(&self) -> bool {
        matches!(self.kind, Kind::Cgroup(_))
    }
}

impl Drop for Confined {
    fn drop(&mut self) {
        self.kill_all();
        if let Kind::Cgroup(cgroup) = &self.kind {
            cgroup.remove();
        }
    }
}

/// A pipe whose write end the subreaper keeps (close-on-exec, so the
/// program never holds it).
fn status_pipe() -> io::Result<(File, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors are new and owned here.
    unsafe { Ok((File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))) }
}

/// The program's wait status, as the subreaper reports it.
async fn read_status(pipe: Option<File>) -> io::Result<ExitStatus> {
    use std::os::unix::process::ExitStatusExt;
    let pipe = pipe.ok_or_else(|| io::Error::other("status already read"))?;
    let mut raw = [0u8; 4];
    tokio::fs::File::from_std(pipe)
        .read_exact(&mut raw)
        .await
        .map_err(|e| io::Error::other(format!("the command's subreaper ended early: {e}")))?;
    Ok(ExitStatus::from_raw(i32::from_ne_bytes(raw)))
}

/// The command's own cgroup under the agent's.
struct Cgroup {
    dir: PathBuf,
    procs: File,
}

static SEQUENCE: AtomicU64 = AtomicU64::new(0);

impl Cgroup {
    /// A new cgroup for one command, or `None` where none can be made.
    fn create() -> Option<Self> {
        let base = cgroup_base()?;
        let dir = base.join(format!(
            "otabox-cmd-{}-{}",
            std::process::id(),
            SEQUENCE.fetch_add(1, Ordering::Relaxed)
        ));
        if let Err(e) = std::fs::create_dir(&dir) {
            tracing::debug!("cannot make cgroup {}: {e}", dir.display());
            return None;
        }
        let cgroup = match File::options().write(true).open(dir.join("cgroup.procs")) {
            Ok(procs) => Self { dir, procs },
            Err(e) => {
                tracing::debug!("cannot open {}/cgroup.procs: {e}", dir.display());
                let _ = std::fs::remove_dir(&dir);
                return None;
            }
        };
        cgroup.bound("pids.max", &PIDS_MAX.to_string());
        cgroup.bound("memory.max", &MEMORY_MAX.to_string());
        Some(cgroup)
    }

    /// Writes a limit where its controller is enabled.
    fn bound(&self, file: &str, value: &str) {
        let path = self.dir.join(file);
        if path.exists()
            && let Err(e) = std::fs::write(&path, value)
        {
            tracing::debug!("cannot set {}: {e}", path.display());
        }
    }

    fn populated(&self) -> bool {
        std::fs::read_to_string(self.dir.join("cgroup.events"))
            .map(|events| events.lines().any(|l| l == "populated 1"))
            .unwrap_or(false)
    }

    /// Kills every process in the cgroup (`cgroup.kill`, or one by one on
    /// kernels without it).
    fn kill(&self) {
        if std::fs::write(self.dir.join("cgroup.kill"), "1").is_ok() {
            return;
        }
        for _ in 0..100 {
            let Ok(pids) = std::fs::read_to_string(self.dir.join("cgroup.procs")) else {
                return;
            };
            if pids.trim().is_empty() {
                return;
            }
            for pid in pids
                .lines()
                .filter_map(|l| l.trim().parse::<libc::pid_t>().ok())
            {
                // SAFETY: kill only sends a signal to a member of this cgroup.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }

    /// Moves the remaining processes to the agent's own cgroup.
    fn release(&self) {
        let (Some(base), Ok(pids)) = (
            cgroup_base(),
            std::fs::read_to_string(self.dir.join("cgroup.procs")),
        ) else {
            return;
        };
        for pid in pids.lines() {
            if let Err(e) = std::fs::write(base.join("cgroup.procs"), pid) {
                tracing::warn!(
                    "cannot move process {pid} out of {}: {e}",
                    self.dir.display()
                );
            }
        }
    }

    /// Removes the cgroup once its killed processes are gone.
    fn remove(&self) {
        let until = Instant::now() + Duration::from_millis(500);
        while self.populated() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(1));
        }
        if let Err(e) = std::fs::remove_dir(&self.dir) {
            tracing::warn!("cannot remove cgroup {}: {e}", self.dir.display());
        }
    }
}

/// The agent's own cgroup in the cgroup2 hierarchy, with the pids and
/// memory controllers enabled for its children where available; `None`
/// without cgroup2.
fn cgroup_base() -> Option<&'static PathBuf> {
    static BASE: OnceLock<Option<PathBuf>> = OnceLock::new();
    BASE.get_or_init(|| {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        let mount = mountinfo.lines().find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            (right.split_whitespace().next() == Some("cgroup2"))
                .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
        })?;
        let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        let path = own.lines().find_map(|l| l.strip_prefix("0::"))?;
        let base = mount.join(path.trim_start_matches('/'));
        enable_controllers(&base);
        Some(base)
    })
    .as_ref()
}

fn enable_controllers(base: &Path) {
    let available = std::fs::read_to_string(base.join("cgroup.controllers")).unwrap_or_default();
    for controller in ["pids", "memory"] {
        if available.split_whitespace().any(|c| c == controller)
            && let Err(e) = std::fs::write(
                base.join("cgroup.subtree_control"),
                format!("+{controller}"),
            )
        {
            tracing::debug!("cannot enable the {controller} controller for commands: {e}");
        }
    }
}

/// Stops every descendant of `root` (rescanning until no new one appears,
/// so none can fork away), then kills them and `root`; how many
/// descendants there were.
fn kill_tree(root: libc::pid_t) -> usize {
    let mut stopped = BTreeSet::new();
    for _ in 0..1000 {
        let new: Vec<libc::pid_t> = descendants(root)
            .into_iter()
            .filter(|p| !stopped.contains(p))
            .collect();
        if new.is_empty() {
            break;
        }
        for pid in new {
            // SAFETY: kill only sends a signal to a descendant of the command.
            unsafe { libc::kill(pid, libc::SIGSTOP) };
            stopped.insert(pid);
        }
    }
    let count = stopped.len();
    for pid in stopped.into_iter().chain([root]) {
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    count
}

/// Every live descendant of `root`, from `/proc`.
fn descendants(root: libc::pid_t) -> Vec<libc::pid_t> {
    let mut children: BTreeMap<libc::pid_t, Vec<libc::pid_t>> = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        if let Some((ppid, state)) = parent_of(pid)
            && state != 'Z'
        {
            children.entry(ppid).or_default().push(pid);
        }
    }
    let mut found = Vec::new();
    let mut queue = vec![root];
    while let Some(pid) = queue.pop() {
        for &child in children.get(&pid).into_iter().flatten() {
            found.push(child);
            queue.push(child);
        }
    }
    found
}

/// (parent pid, state) of `pid`, from `/proc/PID/stat`.
fn parent_of(pid: libc::pid_t) -> Option<(libc::pid_t, char)> {
    let mut stat = String::new();
    File::open(format!("/proc/{pid}/stat"))
        .ok()?
        .read_to_string(&mut stat)
        .ok()?;
    let mut rest = stat.get(stat.rfind(')')? + 1..)?.split_whitespace();
    let state = rest.next()?.chars().next()?;
    Some((rest.next()?.parse().ok()?, state))
}

/// The highest capability number of this kernel.
fn last_capability() -> u32 {
    static LAST: OnceLock<u32> = OnceLock::new();
    *LAST.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(40)
    })
}

/// How the child keeps its processes together.
#[derive(Clone, Copy)]
enum Join {
    /// Writes itself into this `cgroup.procs`.
    Cgroup(RawFd),
    /// Becomes a subreaper and forks the program; reports its wait status
    /// on this pipe.
    Reaper(RawFd),
}

/// Everything the child does before `exec`, prepared in the parent.
struct ChildSetup {
    join: Join,
    keep: CapSet,
    run_as: Option<RunAs>,
    last_cap: u32,
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAP_VERSION_3: u32 = 0x2008_0522;

impl ChildSetup {
    fn new(privileges: &Privileges, join: Join) -> Self {
        Self {
            join,
            keep: privileges.keep,
            run_as: privileges.run_as.clone(),
            last_cap: last_capability(),
        }
    }

    /// Runs in the forked child: only async-signal-safe system calls.
    fn apply(&self) -> io::Result<()> {
        match self.join {
            Join::Cgroup(fd) => check(write_all(fd, b"0"))?,
            Join::Reaper(fd) => self.fork_subreaper(fd)?,
        }
        self.drop_privileges()
    }

    fn fork_subreaper(&self, status_fd: RawFd) -> io::Result<()> {
        // SAFETY: prctl and fork are async-signal-safe; the subreaper runs
        // only system calls and never returns.
        unsafe {
            check(prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0))?;
            match libc::fork() {
                -1 => Err(io::Error::last_os_error()),
                0 => Ok(()),
                program => subreaper(program, status_fd),
            }
        }
    }

    fn drop_privileges(&self) -> io::Result<()> {
        // SAFETY: prctl, capget/capset, setgroups, setgid and setuid are
        // system calls on memory owned by `self` or the stack.
        unsafe {
            for cap in 0..=self.last_cap {
                if !self.keep.contains(cap) && prctl(libc::PR_CAPBSET_DROP, cap.into(), 0) != 0 {
                    let err = io::Error::last_os_error();
                    // Without CAP_SETPCAP the agent holds no capability a
                    // program could inherit (and no_new_privs stops file
                    // capabilities).
                    if err.raw_os_error() != Some(libc::EINVAL) && effective_caps()? != 0 {
                        return Err(err);
                    }
                }
            }
            prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
                0,
            );
            let other_user = self
                .run_as
                .as_ref()
                .and_then(|r| r.uid)
                .is_some_and(|u| u != 0);
            let ambient = other_user && !self.keep.is_empty();
            if ambient {
                check(prctl(libc::PR_SET_KEEPCAPS, 1, 0))?;
            }
            if let Some(run_as) = &self.run_as {
                check(libc::setgroups(run_as.groups.len(), run_as.groups.as_ptr()))?;
                check(libc::setgid(run_as.gid))?;
                if let Some(uid) = run_as.uid {
                    check(libc::setuid(uid))?;
                }
            }
            self.set_capabilities(ambient)?;
            check(prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0))
        }
    }

    /// Inheritable (and for another user permitted, effective and ambient)
    /// capabilities: the kept ones.
    unsafe fn set_capabilities(&self, ambient: bool) -> io::Result<()> {
        let mut header = CapHeader {
            version: CAP_VERSION_3,
            pid: 0,
        };
        let mut data = [CapData::default(); 2];
        // SAFETY: capget/capset read and write one header and two data words.
        unsafe {
            check(libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) as i32)?;
            for (i, word) in data.iter_mut().enumerate() {
                let keep = (self.keep.0 >> (32 * i)) as u32 & word.permitted;
                word.inheritable = keep;
                if ambient {
                    word.permitted = keep;
                    word.effective = keep;
                }
            }
            check(libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) as i32)?;
            if ambient {
                for cap in (0..=self.last_cap).filter(|&c| self.keep.contains(c)) {
                    check(prctl(
                        libc::PR_CAP_AMBIENT,
                        libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                        cap.into(),
                    ))?;
                }
            }
        }
        Ok(())
    }
}

/// The calling process's effective capabilities, lower word.
fn effective_caps() -> io::Result<u32> {
    let mut header = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget writes one header and two data words.
    check(unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) } as i32)?;
    Ok(data[0].effective | data[1].effective)
}

/// The subreaper: waits for the program, reports its status, then reaps
/// adopted orphans until the agent kills them (and it), or none is left.
///
/// # Safety
/// Runs in a forked child of a multi-threaded process: system calls only.
unsafe fn subreaper(program: libc::pid_t, status_fd: RawFd) -> ! {
    // SAFETY: signal, close_range, waitpid, write, pause and _exit are
    // async-signal-safe system calls.
    unsafe {
        libc::signal(libc::SIGCHLD, libc::SIG_DFL);
        for fd in 0..3 {
            libc::close(fd);
        }
        let max = libc::c_uint::MAX;
        let keep = status_fd as libc::c_uint;
        libc::syscall(
            libc::SYS_close_range,
            3 as libc::c_uint,
            keep - 1,
            0 as libc::c_uint,
        );
        libc::syscall(libc::SYS_close_range, keep + 1, max, 0 as libc::c_uint);
        let mut status = 0;
        loop {
            let r = libc::waitpid(program, &mut status, 0);
            if r == program || (r < 0 && *libc::__errno_location() != libc::EINTR) {
                break;
            }
        }
        let bytes = status.to_ne_bytes();
        write_all(status_fd, &bytes);
        // Orphans of the program are children of this process now; with
        // none left there is nothing more to hold (and std, when the exec
        // failed, waits for this process).
        loop {
            if libc::waitpid(-1, std::ptr::null_mut(), 0) < 0
                && *libc::__errno_location() == libc::ECHILD
            {
                libc::_exit(0);
            }
        }
    }
}

/// Writes all of `bytes` to `fd`; 0 or -1.
fn write_all(fd: RawFd, bytes: &[u8]) -> libc::c_int {
    let mut done = 0;
    while done < bytes.len() {
        // SAFETY: writes from a live slice.
        let n = unsafe { libc::write(fd, bytes[done..].as_ptr().cast(), bytes.len() - done) };
        if n < 0 {
            // SAFETY: reads this thread's errno.
            if unsafe { *libc::__errno_location() } == libc::EINTR {
                continue;
            }
            return -1;
        }
        done += n as usize;
    }
    0
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `prctl(option, a, b, 0, 0)` with every argument a full word.
fn prctl(option: libc::c_int, a: libc::c_ulong, b: libc::c_ulong) -> libc::c_int {
    let zero: libc::c_ulong = 0;
    // SAFETY: prctl takes five words; the options used here read no memory.
    unsafe { libc::prctl(option, a, b, zero, zero) }
}
