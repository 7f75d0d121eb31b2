//! Fault injection for crash tests: when `OTABOX_FAILPOINT` names a point
//! the agent passes, the process aborts there, as a power cut or SIGKILL
//! would stop it. Points are named after the journal write they follow,
//! such as `journal:downloading` or `journal:installing:apply`.

/// Aborts the process if `OTABOX_FAILPOINT` equals `point`.
pub fn hit(point: &str) {
    if std::env::var_os("OTABOX_FAILPOINT").is_some_and(|want| want == point) {
        eprintln!("failpoint {point}: aborting");
        std::process::abort();
    }
}
