//! Fault injection for crash tests: when `OTABOX_FAILPOINT` names a point
//! the agent passes, the process aborts there, as a power cut or SIGKILL
//! would stop it. Points are named after the journal write they follow,
//! such as `journal:downloading` or `journal:installing:apply`; one point,
//! `session:hang`, makes the agent's session loop hang instead (for the
//! systemd watchdog test).

/// Aborts the process if `OTABOX_FAILPOINT` equals `point`.
pub fn hit(point: &str) {
    if std::env::var_os("OTABOX_FAILPOINT").is_some_and(|want| want == point) {
        eprintln!("failpoint {point}: aborting");
        std::process::abort();
    }
}

/// Never returns if `OTABOX_FAILPOINT` equals `point`: the caller hangs, as
/// a loop stuck on a lock or a bug would (the rest of the process runs on).
pub async fn hang(point: &str) {
    if std::env::var_os("OTABOX_FAILPOINT").is_some_and(|want| want == point) {
        eprintln!("failpoint {point}: hanging");
        std::future::pending::<()>().await;
    }
}
