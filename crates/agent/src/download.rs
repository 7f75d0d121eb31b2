//! Fetching payload files into a job folder, verified against their declared
//! size and sha256 before any handler sees them.
//!
//! HTTP(S) downloads stream into `<dest>.partial`, hashed as they are
//! written; more bytes than declared are refused. A download that stops (a
//! dropped connection, a stall, an agent restart) resumes with `Range` and
//! `If-Range`: the validator (ETag or Last-Modified) is kept beside the
//! partial file in `<dest>.partial.json`, and a server whose validator
//! changed sends the whole file again, which restarts from zero. The bytes
//! become `<dest>` only once complete and verified. `file://` URLs (payloads
//! staged on the device) are copied and verified the same way.
//!
//! Pre-signed URLs carry credentials in their query: no message or log line
//! made here shows a URL's query or user info ([`redact`]), and the device's
//! own token (from a credentials endpoint) goes only to the hosts named for
//! it. Payloads and partial files are private to the agent (mode 0600).

use std::fmt;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures_util::StreamExt;
use reqwest::StatusCode;
use reqwest::header::{CONTENT_RANGE, ETAG, IF_RANGE, LAST_MODIFIED, RANGE, TRANSFER_ENCODING};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use otabox_core::durable;
use otabox_core::shadow::FileSpec;
use otabox_core::trust::verify_file;

/// Why a download failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureKind {
    /// 403: a pre-signed URL expired; the cloud should issue a new one.
    UrlExpired,
    /// 401: the server wants credentials: a bearer token is missing or was
    /// refused.
    Unauthorized,
    /// 404.
    NotFound,
    /// The content does not match the declared size or sha256.
    Mismatch,
    /// Not enough free space for the payload.
    DiskFull,
    /// The server misbehaved (bad Content-Range, other status codes).
    Protocol,
    /// The network failed or stalled, retries exhausted.
    Network,
    /// A local error (files, configuration).
    Local,
}

/// A failed download: what kind, and the details.
#[derive(Debug)]
pub struct DownloadError {
    /// The kind, for the report's result code.
    pub kind: FailureKind,
    /// What happened.
    pub message: String,
}

impl fmt::Display for DownloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.message)
    }
}

impl std::error::Error for DownloadError {}

impl DownloadError {
    /// The error with every verbatim trace of `url`'s secrets (its query
    /// and user info) taken out, whatever produced the message.
    fn scrubbed(mut self, url: &str) -> Self {
        self.message = scrub(self.message, url);
        self
    }
}

fn fail(kind: FailureKind, message: impl Into<String>) -> DownloadError {
    DownloadError {
        kind,
        message: message.into(),
    }
}

/// Download settings.
#[derive(Debug, Clone)]
pub struct DownloadOptions {
    /// PEM file of extra CA certificates for HTTPS.
    pub ca_file: Option<PathBuf>,
    /// Time to connect.
    pub connect_timeout: Duration,
    /// Longest wait for the next bytes of a body.
    pub stall_timeout: Duration,
    /// Attempts per file (network errors, truncated bodies).
    pub attempts: u32,
    /// First delay between attempts (doubles).
    pub retry_delay: Duration,
    /// Where temporary credentials come from, for files without a token:
    /// `GET` with the device's TLS identity, answering `{"token": "..."}`.
    pub credentials_url: Option<String>,
    /// The device's TLS identity for the credentials endpoint (cert, key).
    pub identity: Option<(PathBuf, PathBuf)>,
    /// The hosts (`host` or `host:port`) that may receive the token from
    /// the credentials endpoint; `None`: the host of `credentials_url` only.
    pub credentials_hosts: Option<Vec<String>>,
}

impl Default for DownloadOptions {
    fn default() -> Self {
        Self {
            ca_file: None,
            connect_timeout: Duration::from_secs(15),
            stall_timeout: Duration::from_secs(30),
            attempts: 8,
            retry_delay: Duration::from_millis(500),
            credentials_url: None,
            identity: None,
            credentials_hosts: None,
        }
    }
}

/// Receives `(bytes done, bytes in all)` as a download progresses.
pub type Progress<'a> = &'a (dyn Fn(u64, u64) + Sync);

/// The validator of a partial download.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
struct Partial {
    url: String,
    etag: Option<String>,
    last_modified: Option<String>,
}

/// An HTTP(S) client for payloads.
#[derive(Clone)]
pub struct Downloader {
    client: reqwest::Client,
    /// The client presenting the device's identity to the credentials endpoint.
    credentials_client: Option<reqwest::Client>,
    /// The token last fetched from the credentials endpoint.
    token: Arc<tokio::sync::Mutex<Option<String>>>,
    /// Where that token may go.
    credentials_hosts: Vec<HostRule>,
    options: DownloadOptions,
}

/// A host, and maybe a port, that may receive the device's token.
#[derive(Debug, Clone, PartialEq, Eq)]
struct HostRule {
    /// The host as a parsed URL spells it (lower case, IPv6 in brackets).
    host: String,
    /// The port; any port when `None`.
    port: Option<u16>,
}

impl HostRule {
    /// Parses `host` or `host:port` (an IPv6 address in brackets).
    fn parse(entry: &str) -> anyhow::Result<Self> {
        let bad = || {
            anyhow::anyhow!("[download] credentials_hosts: {entry:?} is not a host or host:port")
        };
        let url = reqwest::Url::parse(&format!("http://{entry}/")).map_err(|_| bad())?;
        let plain = url.username().is_empty()
            && url.password().is_none()
            && url.path() == "/"
            && url.query().is_none()
            && url.fragment().is_none();
        let host = url.host_str().filter(|_| plain).ok_or_else(bad)?;
        let port = match entry.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') || h.ends_with(']') => {
                Some(p.parse::<u16>().map_err(|_| bad())?)
            }
            _ => None,
        };
        Ok(Self {
            host: host.to_string(),
            port,
        })
    }

    /// Whether requests to `url` may carry the token.
    fn admits(&self, url: &str) -> bool {
        reqwest::Url::parse(url).is_ok_and(|u| {
            u.host_str() == Some(self.host.as_str())
                && self
                    .port
                    .is_none_or(|p| u.port_or_known_default() == Some(p))
        })
    }
}

/// The hosts that may receive the credentials endpoint's token.
fn credentials_hosts(options: &DownloadOptions) -> anyhow::Result<Vec<HostRule>> {
    match (&options.credentials_hosts, &options.credentials_url) {
        (Some(hosts), _) => hosts.iter().map(|h| HostRule::parse(h)).collect(),
        (None, Some(url)) => {
            let host = reqwest::Url::parse(url)
                .ok()
                .and_then(|u| u.host_str().map(str::to_string))
                .with_context(|| {
                    format!("[download] credentials_url {} is not a URL", redact(url))
                })?;
            Ok(vec![HostRule { host, port: None }])
        }
        (None, None) => Ok(Vec::new()),
    }
}

/// Outcome of one attempt.
enum Attempt {
    Done,
    Retry(String),
}

impl Downloader {
    /// A downloader trusting the system roots plus `options.ca_file`.
    pub fn new(options: DownloadOptions) -> anyhow::Result<Self> {
        let client = http_client(&options, None)?;
        let credentials_client = match (&options.credentials_url, &options.identity) {
            (Some(_), Some(identity)) => Some(http_client(&options, Some(identity))?),
            (Some(_), None) => {
                anyhow::bail!("a credentials endpoint needs the device's certificate and key")
            }
            _ => None,
        };
        Ok(Self {
            client,
            credentials_client,
            token: Default::default(),
            credentials_hosts: credentials_hosts(&options)?,
            options,
        })
    }

    /// Whether the credentials endpoint's token may go with a request to
    /// `url` (never to a host that only a deployment names).
    fn may_send_credentials(&self, url: &str) -> bool {
        self.credentials_hosts.iter().any(|h| h.admits(url))
    }

    /// The bearer token from the credentials endpoint (cached; `refresh`
    /// fetches a new one). Never logged.
    async fn endpoint_token(&self, refresh: bool) -> Result<Option<String>, DownloadError> {
        let (Some(url), Some(client)) = (&self.options.credentials_url, &self.credentials_client)
        else {
            return Ok(None);
        };
        let mut cached = self.token.lock().await;
        if cached.is_some() && !refresh {
            return Ok(cached.clone());
        }
        let response = client.get(url).send().await.map_err(|e| {
            fail(
                FailureKind::Unauthorized,
                format!("credentials endpoint {}: {}", redact(url), describe(e)),
            )
        })?;
        if !response.status().is_success() {
            return Err(fail(
                FailureKind::Unauthorized,
                format!(
                    "credentials endpoint {}: {}",
                    redact(url),
                    response.status()
                ),
            ));
        }
        #[derive(Deserialize)]
        struct Credentials {
            token: String,
        }
        let body = response.bytes().await.map_err(|e| {
            fail(
                FailureKind::Unauthorized,
                format!("credentials endpoint {}: {}", redact(url), describe(e)),
            )
        })?;
        let credentials: Credentials = serde_json::from_slice(&body).map_err(|e| {
            fail(
                FailureKind::Unauthorized,
                format!("credentials endpoint {}: {e}", redact(url)),
            )
        })?;
        *cached = Some(credentials.token);
        Ok(cached.clone())
    }

    /// Fetches `file` to `dest`, resuming a partial download; a complete,
    /// verified `dest` is kept as it is. `token` is sent as a bearer token.
    pub async fn fetch(
        &self,
        file: &FileSpec,
        dest: &Path,
        token: Option<&str>,
    ) -> Result<(), DownloadError> {
        self.fetch_with_progress(file, dest, token, &|_, _| {})
            .await
    }

    /// Like [`Downloader::fetch`], calling `progress(done, total)` as bytes
    /// arrive.
    pub async fn fetch_with_progress(
        &self,
        file: &FileSpec,
        dest: &Path,
        token: Option<&str>,
        progress: Progress<'_>,
    ) -> Result<(), DownloadError> {
        self.fetch_file(file, dest, token, progress)
            .await
            .map_err(|e| e.scrubbed(&file.url))
    }

    async fn fetch_file(
        &self,
        file: &FileSpec,
        dest: &Path,
        token: Option<&str>,
        progress: Progress<'_>,
    ) -> Result<(), DownloadError> {
        let endpoint =
            if token.is_none() && file.token.is_none() && self.may_send_credentials(&file.url) {
                self.endpoint_token(false).await?
            } else {
                None
            };
        let mut refreshed = false;
        let token = token
            .or(file.token.as_deref())
            .or(endpoint.as_deref())
            .map(str::to_string);
        if dest.exists() && verify_file(dest, file.size, &file.sha256).is_ok() {
            return Ok(());
        }
        if let Some(dir) = dest.parent() {
            durable::create_private_dir(dir)
                .map_err(|e| fail(FailureKind::Local, format!("{e:#}")))?;
        }
        if let Some(path) = file.url.strip_prefix("file://") {
            return copy_local(file, Path::new(path), dest);
        }
        let mut delay = self.options.retry_delay;
        let mut last = String::new();
        let mut token = token;
        for attempt in 1..=self.options.attempts.max(1) {
            let result = self.attempt(file, dest, token.as_deref(), progress).await;
            let result = match result {
                // A token from the endpoint may have expired: fetch a new one once.
                Err(e)
                    if e.kind == FailureKind::Unauthorized && endpoint.is_some() && !refreshed =>
                {
                    refreshed = true;
                    token = self.endpoint_token(true).await?;
                    continue;
                }
                other => other?,
            };
            match result {
                Attempt::Done => return Ok(()),
                Attempt::Retry(why) => {
                    let why = scrub(why, &file.url);
                    tracing::info!(
                        file = file.name,
                        attempt,
                        "download interrupted: {why}; resuming in {delay:?}"
                    );
                    last = why;
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(30));
        }
        Err(fail(
            FailureKind::Network,
            format!(
                "{}: gave up after {} attempts: {last}",
                file.name, self.options.attempts
            ),
        ))
    }

    /// Fetches a small document (a manifest) of at most `max` bytes whose
    /// sha256 is known, to `dest`; kept as it is when already there.
    pub async fn fetch_document(
        &self,
        url: &str,
        sha256: &str,
        max: u64,
        dest: &Path,
    ) -> Result<(), DownloadError> {
        self.fetch_small(url, sha256, max, dest)
            .await
            .map_err(|e| e.scrubbed(url))
    }

    async fn fetch_small(
        &self,
        url: &str,
        sha256: &str,
        max: u64,
        dest: &Path,
    ) -> Result<(), DownloadError> {
        if std::fs::read(dest).is_ok_and(|b| hex::encode(Sha256::digest(&b)) == sha256) {
            return Ok(());
        }
        let bytes = if let Some(path) = url.strip_prefix("file://") {
            let url = redact(url);
            let meta = std::fs::metadata(path)
                .map_err(|e| fail(FailureKind::NotFound, format!("{url}: {e}")))?;
            if meta.len() > max {
                return Err(fail(
                    FailureKind::Mismatch,
                    format!("{url}: over the {max}-byte limit"),
                ));
            }
            std::fs::read(path).map_err(|e| fail(FailureKind::NotFound, format!("{url}: {e}")))?
        } else {
            self.get_capped(url, max).await?
        };
        let actual = hex::encode(Sha256::digest(&bytes));
        if actual != sha256 {
            return Err(fail(
                FailureKind::Mismatch,
                format!("{}: sha256 is {actual}, {sha256} declared", redact(url)),
            ));
        }
        if let Some(dir) = dest.parent() {
            durable::create_private_dir(dir)
                .map_err(|e| fail(FailureKind::Local, format!("{e:#}")))?;
        }
        durable::write_atomic(dest, &bytes).map_err(|e| fail(FailureKind::Local, format!("{e:#}")))
    }

    async fn get_capped(&self, url: &str, max: u64) -> Result<Vec<u8>, DownloadError> {
        let response = self.client.get(url).send().await.map_err(|e| {
            fail(
                FailureKind::Network,
                format!("{}: {}", redact(url), describe(e)),
            )
        })?;
        match response.status() {
            StatusCode::OK => {}
            StatusCode::FORBIDDEN => {
                return Err(fail(
                    FailureKind::UrlExpired,
                    format!("{}: 403", redact(url)),
                ));
            }
            StatusCode::UNAUTHORIZED => {
                return Err(fail(
                    FailureKind::Unauthorized,
                    format!("{}: 401", redact(url)),
                ));
            }
            StatusCode::NOT_FOUND => {
                return Err(fail(FailureKind::NotFound, format!("{}: 404", redact(url))));
            }
            s => {
                return Err(fail(
                    FailureKind::Protocol,
                    format!("{}: status {s}", redact(url)),
                ));
            }
        }
        let mut bytes = Vec::new();
        let mut body = response.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| {
                fail(
                    FailureKind::Network,
                    format!("{}: {}", redact(url), describe(e)),
                )
            })?;
            if bytes.len() as u64 + chunk.len() as u64 > max {
                return Err(fail(
                    FailureKind::Mismatch,
                    format!("{}: over the {max}-byte limit", redact(url)),
                ));
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(bytes)
    }

    async fn attempt(
        &self,
        file: &FileSpec,
        dest: &Path,
        token: Option<&str>,
        progress: Progress<'_>,
    ) -> Result<Attempt, DownloadError> {
        let (partial_path, meta_path) = (sibling(dest, "partial"), sibling(dest, "partial.json"));
        let (mut offset, validator) = resume_point(file, &partial_path, &meta_path);
        if offset == file.size && offset > 0 {
            // Every byte arrived before a stop ahead of the rename.
            if verify_file(&partial_path, file.size, &file.sha256).is_ok() {
                return put_in_place(&partial_path, &meta_path, dest).map(|()| Attempt::Done);
            }
            discard(&partial_path, &meta_path);
            offset = 0;
        }
        check_space(dest, file.size.saturating_sub(offset))?;
        let mut request = self.client.get(&file.url);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if offset > 0 {
            request = request
                .header(RANGE, format!("bytes={offset}-"))
                .header(IF_RANGE, validator.clone().unwrap_or_default());
        }
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) => return Ok(Attempt::Retry(self.request_failure(e))),
        };
        let status = response.status();
        let resumed = status == StatusCode::PARTIAL_CONTENT;
        match status {
            StatusCode::OK => offset = 0,
            StatusCode::PARTIAL_CONTENT => {
                check_content_range(&response, offset, file.size, &partial_path, &meta_path)?
            }
            StatusCode::RANGE_NOT_SATISFIABLE => {
                discard(&partial_path, &meta_path);
                return unsatisfiable(file, &response);
            }
            StatusCode::FORBIDDEN => {
                return Err(fail(
                    FailureKind::UrlExpired,
                    format!(
                        "{}: 403: the URL expired or is not for this device",
                        file.name
                    ),
                ));
            }
            StatusCode::UNAUTHORIZED => {
                let why = if token.is_some() {
                    "the bearer token was refused"
                } else if self.options.credentials_url.is_some() {
                    "a bearer token is required (the device's token goes only to the \
                     hosts in [download] credentials_hosts)"
                } else {
                    "a bearer token is required"
                };
                return Err(fail(
                    FailureKind::Unauthorized,
                    format!("{}: 401: {why}", file.name),
                ));
            }
            StatusCode::NOT_FOUND => {
                return Err(fail(
                    FailureKind::NotFound,
                    format!("{}: 404 at {}", file.name, redact(&file.url)),
                ));
            }
            s if s.is_server_error() => return Ok(Attempt::Retry(format!("server error {s}"))),
            s => {
                return Err(fail(
                    FailureKind::Protocol,
                    format!("{}: unexpected status {s}", file.name),
                ));
            }
        }
        if let Some(length) = response.content_length()
            && offset + length > file.size
        {
            discard(&partial_path, &meta_path);
            return Err(fail(
                FailureKind::Mismatch,
                format!(
                    "{}: the server announces {} bytes, more than the declared {}",
                    file.name,
                    offset + length,
                    file.size
                ),
            ));
        }
        // A response framed by its length or by chunks ends where the
        // server meant it to end; one ended by a closed connection may be cut.
        let framed = response.content_length().is_some()
            || header(&response, TRANSFER_ENCODING).is_some_and(|t| t.contains("chunked"));
        let meta = Partial {
            url: file.url.clone(),
            etag: header(&response, ETAG),
            last_modified: header(&response, LAST_MODIFIED),
        };
        let bytes =
            serde_json::to_vec(&meta).map_err(|e| fail(FailureKind::Local, e.to_string()))?;
        durable::write_atomic(&meta_path, &bytes)
            .map_err(|e| fail(FailureKind::Local, format!("{e:#}")))?;
        let (mut out, mut hasher) = open_partial(&partial_path, offset)?;
        let mut received = offset;
        let mut body = response.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    sync(&out)?;
                    return Ok(Attempt::Retry(self.body_failure(e, received, file.size)));
                }
            };
            if received + chunk.len() as u64 > file.size {
                discard(&partial_path, &meta_path);
                return Err(fail(
                    FailureKind::Mismatch,
                    format!("{}: more than the declared {} bytes", file.name, file.size),
                ));
            }
            out.write_all(&chunk)
                .map_err(|e| disk_error(&partial_path, e))?;
            hasher.update(&chunk);
            received += chunk.len() as u64;
            progress(received, file.size);
        }
        sync(&out)?;
        if received < file.size {
            let short = format!("the server sent {received} of {} declared bytes", file.size);
            if status == StatusCode::OK && framed {
                // A whole response, shorter than declared: not a network fault.
                discard(&partial_path, &meta_path);
                return Err(fail(
                    FailureKind::Mismatch,
                    format!("{}: {short}", file.name),
                ));
            }
            return Ok(Attempt::Retry(short));
        }
        let actual = hex::encode(hasher.finalize());
        if actual != file.sha256 {
            discard(&partial_path, &meta_path);
            if resumed {
                // The kept bytes may be what a power cut left behind: one
                // more try from zero before calling the payload bad.
                return Ok(Attempt::Retry(
                    "sha256 mismatch after a resume; starting over".into(),
                ));
            }
            return Err(fail(
                FailureKind::Mismatch,
                format!(
                    "{}: sha256 is {actual}, {} declared",
                    file.name, file.sha256
                ),
            ));
        }
        put_in_place(&partial_path, &meta_path, dest)?;
        Ok(Attempt::Done)
    }

    /// Why a request got no response, in words and without its URL.
    fn request_failure(&self, e: reqwest::Error) -> String {
        if e.is_timeout() && e.is_connect() {
            format!(
                "no connection within {}",
                seconds(self.options.connect_timeout)
            )
        } else if e.is_timeout() {
            format!(
                "the server sent no response for {}",
                seconds(self.options.stall_timeout)
            )
        } else if e.is_connect() {
            format!("cannot connect: {}", root_cause(&e))
        } else {
            describe(e)
        }
    }

    /// Why a body stopped after `received` of `size` bytes, without its URL.
    fn body_failure(&self, e: reqwest::Error, received: u64, size: u64) -> String {
        if e.is_timeout() {
            format!(
                "the server sent nothing for {} after byte {received}",
                seconds(self.options.stall_timeout)
            )
        } else {
            format!(
                "the server sent {received} of {size} bytes, then the connection broke: {}",
                root_cause(&e)
            )
        }
    }
}

/// The answer to a 416: a server holding fewer (or more) bytes than
/// declared fails the download; otherwise it starts over from zero.
fn unsatisfiable(file: &FileSpec, response: &reqwest::Response) -> Result<Attempt, DownloadError> {
    let total = header(response, CONTENT_RANGE).and_then(|r| {
        r.strip_prefix("bytes */")
            .and_then(|t| t.parse::<u64>().ok())
    });
    match total {
        Some(total) if total < file.size => Err(fail(
            FailureKind::Mismatch,
            format!(
                "{}: the server has {total} of {} declared bytes",
                file.name, file.size
            ),
        )),
        Some(total) if total > file.size => Err(fail(
            FailureKind::Mismatch,
            format!(
                "{}: the server has {total} bytes, more than the declared {}",
                file.name, file.size
            ),
        )),
        _ => Ok(Attempt::Retry(
            "416: the partial file is not resumable; starting over".into(),
        )),
    }
}

/// Makes the complete, verified `partial` the file at `dest`.
fn put_in_place(partial: &Path, meta: &Path, dest: &Path) -> Result<(), DownloadError> {
    std::fs::rename(partial, dest).map_err(|e| fail(FailureKind::Local, e.to_string()))?;
    let _ = std::fs::remove_file(meta);
    durable::sync_dir(dest.parent().unwrap_or(Path::new(".")))
        .map_err(|e| fail(FailureKind::Local, format!("{e:#}")))
}

/// The whole chain of `e`, without the URL reqwest puts in its message.
fn describe(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        let part = c.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        cause = c.source();
    }
    text
}

/// The innermost cause of `e` (an OS error, a protocol error), which
/// names no URL.
fn root_cause(e: &reqwest::Error) -> String {
    let mut cause: &dyn std::error::Error = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    if std::ptr::addr_eq(cause, e) {
        return "no cause given".into();
    }
    cause.to_string()
}

/// A duration as people read it in a message (`30 s`, `500 ms`).
fn seconds(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
    }
}

/// A client trusting the system roots plus `ca_file`, presenting
/// `identity` (cert, key) when given.
fn http_client(
    options: &DownloadOptions,
    identity: Option<&(PathBuf, PathBuf)>,
) -> anyhow::Result<reqwest::Client> {
    let mut roots = rustls::RootCertStore::empty();
    if let Some(ca) = &options.ca_file {
        let pem = std::fs::read(ca).with_context(|| format!("cannot read {}", ca.display()))?;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            roots.add(cert.with_context(|| format!("{} is not PEM", ca.display()))?)?;
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots);
    let tls = match identity {
        Some((cert, key)) => {
            let certs = rustls_pemfile::certs(
                &mut std::fs::read(cert)
                    .with_context(|| format!("cannot read {}", cert.display()))?
                    .as_slice(),
            )
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("{} is not PEM", cert.display()))?;
            let key_der = rustls_pemfile::private_key(
                &mut std::fs::read(key)
                    .with_context(|| format!("cannot read {}", key.display()))?
                    .as_slice(),
            )
            .with_context(|| format!("{} is not PEM", key.display()))?
            .with_context(|| format!("{} holds no private key", key.display()))?;
            builder
                .with_client_auth_cert(certs, key_der)
                .context("the device certificate and key do not match")?
        }
        None => builder.with_no_client_auth(),
    };
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .connect_timeout(options.connect_timeout)
        .read_timeout(options.stall_timeout)
        .tcp_nodelay(true)
        // A redirect would hand the pre-signed URL to the next host.
        .referer(false)
        .build()
        .context("cannot build the HTTP client")
}

/// Where a partial download stands: the bytes to keep and the validator to
/// resume against. Without a usable validator it starts over.
fn resume_point(file: &FileSpec, partial: &Path, meta: &Path) -> (u64, Option<String>) {
    let len = std::fs::metadata(partial).map(|m| m.len()).unwrap_or(0);
    let saved: Option<Partial> = std::fs::read(meta)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let validator = saved
        .filter(|p| p.url == file.url)
        .and_then(|p| p.etag.or(p.last_modified));
    match validator {
        Some(v) if len > 0 && len <= file.size => (len, Some(v)),
        _ => {
            discard(partial, meta);
            (0, None)
        }
    }
}

/// Opens the partial file at `offset` (truncating past it) and hashes the
/// bytes already there.
fn open_partial(path: &Path, offset: u64) -> Result<(std::fs::File, Sha256), DownloadError> {
    let local = |e: std::io::Error| fail(FailureKind::Local, format!("{}: {e}", path.display()));
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .read(true)
        .write(true)
        .truncate(false)
        .mode(durable::FILE_MODE)
        .open(path)
        .map_err(local)?;
    file.set_len(offset).map_err(local)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = offset;
    while left > 0 {
        let n = file
            .read(&mut buf[..left.min(1 << 20) as usize])
            .map_err(local)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        left -= n as u64;
    }
    std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(offset)).map_err(local)?;
    Ok((file, hasher))
}

fn check_content_range(
    response: &reqwest::Response,
    offset: u64,
    size: u64,
    partial: &Path,
    meta: &Path,
) -> Result<(), DownloadError> {
    let range = header(response, CONTENT_RANGE).unwrap_or_default();
    let parsed = range
        .strip_prefix("bytes ")
        .and_then(|r| r.split_once('/'))
        .and_then(|(span, total)| {
            span.split_once('-')
                .map(|(start, _)| (start.parse::<u64>().ok(), total.parse::<u64>().ok()))
        });
    match parsed {
        Some((Some(start), total)) if start == offset && total.is_none_or(|t| t == size) => Ok(()),
        _ => {
            discard(partial, meta);
            Err(fail(
                FailureKind::Protocol,
                format!("bad Content-Range {range:?} for a resume at byte {offset} of {size}"),
            ))
        }
    }
}

fn header(response: &reqwest::Response, name: reqwest::header::HeaderName) -> Option<String> {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// Refuses to start when the filesystem cannot hold `needed` more bytes.
fn check_space(dest: &Path, needed: u64) -> Result<(), DownloadError> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    let c_dir = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|_| fail(FailureKind::Local, "path with a NUL byte"))?;
    // SAFETY: statvfs only writes into the zeroed struct we pass.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c_dir.as_ptr(), &mut stat) } != 0 {
        return Ok(());
    }
    let free = stat.f_bavail as u64 * stat.f_frsize as u64;
    if free < needed {
        return Err(fail(
            FailureKind::DiskFull,
            format!("{needed} bytes needed in {}, {free} free", dir.display()),
        ));
    }
    Ok(())
}

fn disk_error(path: &Path, e: std::io::Error) -> DownloadError {
    let _ = std::fs::remove_file(path);
    let kind = if e.raw_os_error() == Some(libc::ENOSPC) {
        FailureKind::DiskFull
    } else {
        FailureKind::Local
    };
    fail(kind, format!("{}: {e}", path.display()))
}

fn sync(file: &std::fs::File) -> Result<(), DownloadError> {
    file.sync_all().map_err(|e| {
        fail(
            FailureKind::Local,
            format!("cannot sync a partial download: {e}"),
        )
    })
}

fn discard(partial: &Path, meta: &Path) {
    let _ = std::fs::remove_file(partial);
    let _ = std::fs::remove_file(meta);
}

fn sibling(dest: &Path, suffix: &str) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(".");
    name.push(suffix);
    dest.with_file_name(name)
}

/// A URL as messages show it: scheme, host, port and path, never the user
/// info, query or fragment (pre-signed URLs carry credentials there).
pub fn redact(url: &str) -> Redacted<'_> {
    Redacted(url)
}

/// A URL that displays without its secrets; see [`redact`].
#[derive(Debug, Clone, Copy)]
pub struct Redacted<'a>(&'a str);

impl fmt::Display for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let url = self.0.split(['?', '#']).next().unwrap_or_default();
        let Some((scheme, rest)) = url.split_once("://") else {
            return f.write_str(url);
        };
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let host = authority
            .rsplit_once('@')
            .map_or(authority, |(_, host)| host);
        write!(f, "{scheme}://{host}{path}")
    }
}

/// `message` with `url` (whole) shown redacted and its query and user info
/// replaced wherever they still appear verbatim.
fn scrub(message: String, url: &str) -> String {
    let shown = redact(url).to_string();
    let mut message = message.replace(url, &shown);
    let query = url.split_once('?').map(|(_, q)| q);
    let user = url
        .split_once("://")
        .and_then(|(_, rest)| rest.split('/').next())
        .and_then(|authority| authority.rsplit_once('@'))
        .map(|(user, _)| user);
    for secret in [query, user]
        .into_iter()
        .flatten()
        .filter(|s| !s.is_empty())
    {
        message = message.replace(secret, "<redacted>");
    }
    message
}

/// Copies a staged `file://` payload, verified; nothing is left at `dest`
/// on a mismatch.
fn copy_local(file: &FileSpec, source: &Path, dest: &Path) -> Result<(), DownloadError> {
    let url = redact(&file.url);
    if !source.is_absolute() || file.url.contains(['%', '?', '#']) {
        return Err(fail(
            FailureKind::Local,
            format!("{url}: only plain absolute file:// URLs are supported"),
        ));
    }
    check_space(dest, file.size)?;
    let partial = sibling(dest, "partial");
    std::fs::copy(source, &partial)
        .and_then(|_| {
            std::fs::set_permissions(
                &partial,
                std::fs::Permissions::from_mode(durable::FILE_MODE),
            )
        })
        .map_err(|e| fail(FailureKind::NotFound, format!("cannot fetch {url}: {e}")))?;
    if let Err(e) = verify_file(&partial, file.size, &file.sha256) {
        let _ = std::fs::remove_file(&partial);
        return Err(fail(
            FailureKind::Mismatch,
            format!("payload {} from {url}: {e:#}", file.name),
        ));
    }
    std::fs::File::open(&partial)
        .and_then(|f| f.sync_all())
        .and_then(|_| std::fs::rename(&partial, dest))
        .map_err(|e| fail(FailureKind::Local, e.to_string()))?;
    durable::sync_dir(dest.parent().unwrap_or(Path::new(".")))
        .map_err(|e| fail(FailureKind::Local, format!("{e:#}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn copies_verified_local_bytes_and_leaves_nothing_on_mismatch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("src.bin");
        std::fs::write(&src, b"abc").expect("write");
        let good = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let spec = |sha: &str| FileSpec {
            name: "p".into(),
            url: format!("file://{}", src.display()),
            size: 3,
            sha256: sha.into(),
            token: None,
        };
        let downloader = Downloader::new(DownloadOptions::default()).expect("client");
        let dest = dir.path().join("job/p");
        downloader
            .fetch(&spec(good), &dest, None)
            .await
            .expect("fetch");
        assert_eq!(std::fs::read(&dest).expect("read"), b"abc");
        let bad_dest = dir.path().join("job/q");
        let err = downloader
            .fetch(&spec(&"0".repeat(64)), &bad_dest, None)
            .await
            .expect_err("mismatch");
        assert_eq!(err.kind, FailureKind::Mismatch);
        assert!(!bad_dest.exists() && !sibling(&bad_dest, "partial").exists());
    }

    #[test]
    fn urls_show_no_query_user_info_or_fragment() {
        let shown = |url: &str| redact(url).to_string();
        assert_eq!(
            shown("https://h/p.bin?X-Amz-Signature=secret"),
            "https://h/p.bin"
        );
        assert_eq!(
            shown("https://user:pa%40ss@h:8443/a/b?x=1#frag"),
            "https://h:8443/a/b"
        );
        assert_eq!(shown("https://u@h?q=1"), "https://h");
        assert_eq!(shown("http://h/p@x?y"), "http://h/p@x");
        assert_eq!(shown("file:///srv/p.bin"), "file:///srv/p.bin");
        assert_eq!(shown("no url?q"), "no url");
        let url = "https://u:pw@h/p?sig=abc";
        assert_eq!(
            scrub(format!("x {url} y; sig=abc; pw"), url),
            "x https://h/p y; <redacted>; pw"
        );
    }

    #[test]
    fn the_credentials_token_goes_only_to_the_named_hosts() {
        let rule = |s: &str| HostRule::parse(s).expect(s);
        assert!(rule("Creds.Example").admits("https://creds.example:9443/p"));
        assert!(!rule("creds.example").admits("https://creds.example.evil/p"));
        assert!(!rule("creds.example").admits("https://evil/p?h=creds.example"));
        assert!(!rule("creds.example").admits("https://creds.example@evil/p"));
        assert!(rule("creds.example:443").admits("https://creds.example/p"));
        assert!(!rule("creds.example:443").admits("http://creds.example/p"));
        assert!(rule("[::1]:8080").admits("http://[::1]:8080/p"));
        assert!(!rule("127.0.0.1").admits("file:///127.0.0.1/p"));
        for bad in ["https://h", "h/p", "u@h", "h:99999", "h?q", "", "::1"] {
            assert!(HostRule::parse(bad).is_err(), "{bad:?}");
        }
        let options = |url: &str, hosts: Option<Vec<String>>| DownloadOptions {
            credentials_url: Some(url.into()),
            credentials_hosts: hosts,
            ..DownloadOptions::default()
        };
        assert_eq!(
            credentials_hosts(&options("https://creds.example:9443/token", None)).expect("ok"),
            vec![rule("creds.example")]
        );
        assert_eq!(
            credentials_hosts(&options("https://c/t", Some(vec![]))).expect("ok"),
            vec![]
        );
        assert!(credentials_hosts(&options("not a url?k=secret", None)).is_err());
    }
}
