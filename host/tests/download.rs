//! Payload downloads against a real nginx: streaming with sha256, resume
//! with Range + If-Range after cuts at random offsets, a changed validator,
//! expired URLs, oversize, short and mismatching bodies, a stalled server;
//! the secrets of a download (pre-signed queries, bearer tokens) in no
//! message, log line, report or file others may read.

mod common;

use std::path::Path;
use std::time::Duration;

use common::services::{Nginx, cutting_proxy};
use otabox::download::{DownloadOptions, Downloader, FailureKind};
use otabox::runtime::sha256_hex;
use otabox::shadow::FileSpec;

fn payload(nginx: &Nginx, name: &str, len: usize, seed: u64) -> Vec<u8> {
    let bytes = common::noise(len, seed);
    std::fs::write(nginx.www.join(name), &bytes).expect("payload");
    bytes
}

fn spec(url: String, bytes: &[u8]) -> FileSpec {
    FileSpec {
        name: "payload.bin".into(),
        url,
        size: bytes.len() as u64,
        sha256: sha256_hex(bytes),
        token: None,
    }
}

fn downloader(attempts: u32) -> Downloader {
    Downloader::new(DownloadOptions {
        attempts,
        retry_delay: Duration::from_millis(5),
        stall_timeout: Duration::from_millis(500),
        ..DownloadOptions::default()
    })
    .expect("client")
}

/// Downloads `bytes` from `port` into `dir`, which must fail as `kind`
/// with a message ending in `says`.
async fn fails_saying(
    attempts: u32,
    port: u16,
    bytes: &[u8],
    dir: &Path,
    kind: FailureKind,
    says: &str,
) {
    let url = format!("http://127.0.0.1:{port}/p.bin");
    let err = downloader(attempts)
        .fetch(&spec(url, bytes), &dir.join("p.bin"), None)
        .await
        .expect_err("the download must fail");
    assert_eq!(err.kind, kind, "{err}");
    assert!(err.message.ends_with(says), "{err}");
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains("partial"))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn a_download_is_streamed_verified_and_put_in_place() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nginx = Nginx::start(&dir.path().join("nginx"));
    let bytes = payload(&nginx, "p.bin", 3 << 20, 1);
    let dest = dir.path().join("job/p.bin");
    downloader(1)
        .fetch(&spec(nginx.url("p.bin"), &bytes), &dest, None)
        .await
        .expect("download");
    assert_eq!(std::fs::read(&dest).expect("dest"), bytes);
    assert!(leftovers(dest.parent().expect("dir")).is_empty());
    assert_eq!(nginx.requests(), vec![(200, "-".to_string())]);
}

#[tokio::test]
async fn cuts_at_random_offsets_resume_without_fetching_stored_bytes_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nginx = Nginx::start(&dir.path().join("nginx"));
    let size = 2 << 20;
    let bytes = payload(&nginx, "p.bin", size, 7);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for run in 0..20 {
        let cuts: Vec<usize> = (0..4)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                1000 + (x as usize) % (size / 2)
            })
            .collect();
        let proxy = cutting_proxy(nginx.port, cuts);
        let dest = dir.path().join(format!("job-{run}/p.bin"));
        let before = nginx.requests().len();
        downloader(10)
            .fetch(
                &spec(format!("http://127.0.0.1:{proxy}/p.bin"), &bytes),
                &dest,
                None,
            )
            .await
            .unwrap_or_else(|e| panic!("run {run}: {e}"));
        assert_eq!(std::fs::read(&dest).expect("dest"), bytes, "run {run}");
        let requests: Vec<(u16, String)> = nginx.requests().split_off(before);
        let starts: Vec<u64> = requests
            .iter()
            .map(|(_, range)| {
                range
                    .strip_prefix("bytes=")
                    .and_then(|r| r.trim_end_matches('-').parse().ok())
                    .unwrap_or(0)
            })
            .collect();
        assert!(
            starts.windows(2).all(|w| w[0] < w[1]),
            "run {run}: a resume fetched stored bytes again: {requests:?}"
        );
        assert!(
            requests.iter().skip(1).all(|(status, _)| *status == 206),
            "run {run}: {requests:?}"
        );
        assert!(
            requests.len() >= 2,
            "run {run}: the proxy cut nothing: {requests:?}"
        );
    }
}

#[tokio::test]
async fn a_changed_validator_restarts_from_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nginx = Nginx::start(&dir.path().join("nginx"));
    let bytes = payload(&nginx, "p.bin", 1 << 20, 3);
    let dest = dir.path().join("job/p.bin");
    std::fs::create_dir_all(dest.parent().expect("dir")).expect("dir");
    std::fs::write(dir.path().join("job/p.bin.partial"), &bytes[..1000]).expect("partial");
    let meta = serde_json::json!({"url": nginx.url("p.bin"), "etag": "\"an-old-version\"", "last_modified": null});
    std::fs::write(dir.path().join("job/p.bin.partial.json"), meta.to_string()).expect("meta");
    downloader(1)
        .fetch(&spec(nginx.url("p.bin"), &bytes), &dest, None)
        .await
        .expect("download");
    assert_eq!(std::fs::read(&dest).expect("dest"), bytes);
    assert_eq!(
        nginx.requests(),
        vec![(200, "bytes=1000-".to_string())],
        "If-Range must make nginx send it all"
    );
}

#[tokio::test]
async fn failures_are_classified_and_leave_nothing_behind() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nginx = Nginx::start(&dir.path().join("nginx"));
    let bytes = payload(&nginx, "p.bin", 100_000, 5);
    let job = dir.path().join("job");
    let d = downloader(2);

    let expired = d
        .fetch(
            &spec(nginx.url("private/p.bin?X-Signature=s3cret"), &bytes),
            &job.join("a"),
            None,
        )
        .await;
    let err = expired.expect_err("403");
    assert_eq!(err.kind, FailureKind::UrlExpired);
    assert!(!err.message.contains("s3cret"), "{err}");

    let missing = d
        .fetch(&spec(nginx.url("nope.bin"), &bytes), &job.join("b"), None)
        .await
        .expect_err("404");
    assert_eq!(missing.kind, FailureKind::NotFound);

    let mut short = spec(nginx.url("p.bin"), &bytes);
    short.size = 50_000;
    let err = d
        .fetch(&short, &job.join("c"), None)
        .await
        .expect_err("too many bytes");
    assert_eq!(err.kind, FailureKind::Mismatch);
    assert!(err.message.contains("more than the declared"), "{err}");

    let mut wrong = spec(nginx.url("p.bin"), &bytes);
    wrong.sha256 = "0".repeat(64);
    let err = d
        .fetch(&wrong, &job.join("d"), None)
        .await
        .expect_err("hash mismatch");
    assert_eq!(err.kind, FailureKind::Mismatch);
    assert!(err.message.contains("sha256"), "{err}");
    assert!(leftovers(&job).is_empty(), "{:?}", leftovers(&job));
    assert!(!job.join("c").exists() && !job.join("d").exists());
}

#[tokio::test]
async fn a_stalled_server_times_out_and_the_download_fails_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = silent_server(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nfirst bytes");
    let bytes = vec![b'x'; 1000];
    let started = std::time::Instant::now();
    let says = "gave up after 2 attempts: the server sent nothing for 500 ms after byte 11";
    fails_saying(2, port, &bytes, dir.path(), FailureKind::Network, says).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_bearer_token_opens_a_protected_url_and_a_missing_one_is_a_clear_auth_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nginx = Nginx::start(&dir.path().join("nginx"));
    std::fs::create_dir_all(nginx.www.join("auth")).expect("auth dir");
    let bytes = payload(&nginx, "auth/p.bin", 10_000, 9);
    let mut file = spec(nginx.url("auth/p.bin"), &bytes);
    let err = downloader(1)
        .fetch(&file, &dir.path().join("a"), None)
        .await
        .expect_err("no token");
    assert_eq!(err.kind, FailureKind::Unauthorized);
    assert!(err.message.contains("a bearer token is required"), "{err}");
    file.token = Some("wrong".into());
    let err = downloader(1)
        .fetch(&file, &dir.path().join("b"), None)
        .await
        .expect_err("bad token");
    assert!(
        err.message.contains("refused") && !err.message.contains("wrong"),
        "{err}"
    );
    file.token = Some("t0ken".into());
    downloader(1)
        .fetch(&file, &dir.path().join("c"), None)
        .await
        .expect("with the token");
    assert_eq!(std::fs::read(dir.path().join("c")).expect("dest"), bytes);
}

#[tokio::test]
async fn a_corrupt_partial_file_is_fetched_again_from_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nginx = Nginx::start(&dir.path().join("nginx"));
    let bytes = payload(&nginx, "p.bin", 200_000, 11);
    let dest = dir.path().join("job/p.bin");
    // A first download cut half-way keeps its bytes and validator; then the
    // kept bytes become zeros, as a power cut can leave them.
    let proxy = cutting_proxy(nginx.port, vec![120_000]);
    let via_proxy = spec(format!("http://127.0.0.1:{proxy}/p.bin"), &bytes);
    assert!(
        downloader(1).fetch(&via_proxy, &dest, None).await.is_err(),
        "the proxy cut the only attempt"
    );
    let partial = dir.path().join("job/p.bin.partial");
    let kept = std::fs::metadata(&partial).expect("partial kept").len() as usize;
    std::fs::write(&partial, vec![0u8; kept]).expect("corrupt");
    downloader(3)
        .fetch(&via_proxy, &dest, None)
        .await
        .expect("starts over and succeeds");
    assert_eq!(std::fs::read(&dest).expect("dest"), bytes);
    let statuses: Vec<u16> = nginx.requests().iter().map(|(status, _)| *status).collect();
    assert_eq!(
        statuses,
        [200, 206, 200],
        "cut, resumed onto garbage, then from zero"
    );
}

#[tokio::test]
async fn a_full_disk_fails_early_and_leaves_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nginx = Nginx::start(&dir.path().join("nginx"));
    let bytes = payload(&nginx, "big.bin", 2 << 20, 13);
    let small = dir.path().join("small");
    std::fs::create_dir_all(&small).expect("mount point");
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&small)
        .status()
        .expect("run mount");
    assert!(
        mounted.success(),
        "this test needs to mount a 1 MiB tmpfs (root)"
    );
    let result = downloader(1)
        .fetch(
            &spec(nginx.url("big.bin"), &bytes),
            &small.join("big.bin"),
            None,
        )
        .await;
    let left: Vec<_> = std::fs::read_dir(&small)
        .expect("list")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    let _ = std::process::Command::new("umount").arg(&small).status();
    let err = result.expect_err("2 MiB cannot fit in 1 MiB");
    assert_eq!(err.kind, FailureKind::DiskFull, "{err}");
    assert!(left.is_empty(), "{left:?}");
    assert!(
        nginx.requests().is_empty(),
        "it must fail before fetching anything"
    );
}

/// An HTTP server that answers each request with the next scripted
/// response (raw bytes); returns its port.
fn scripted_server(responses: Vec<Vec<u8>>) -> u16 {
    let script = std::sync::Mutex::new(responses.into_iter());
    serve(move |mut conn| {
        let next = script.lock().ok().and_then(|mut s| s.next());
        if let Some(response) = next {
            let _ = std::io::Write::write_all(&mut conn, &response);
        }
    })
}

/// A loopback HTTP server: reads each request, then lets `answer` have the
/// connection (in a thread of its own); returns its port.
fn serve(answer: impl Fn(std::net::TcpStream) + Send + Sync + 'static) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listener");
    let port = listener.local_addr().expect("addr").port();
    let answer = std::sync::Arc::new(answer);
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let mut request = [0u8; 4096];
            let _ = std::io::Read::read(&mut conn, &mut request);
            let answer = answer.clone();
            std::thread::spawn(move || answer(conn));
        }
    });
    port
}

fn response(status: &str, headers: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n{headers}\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

/// A partial download of `bytes[..kept]` with a validator, as a cut left it.
fn leave_partial(dest: &Path, url: &str, bytes: &[u8], kept: usize) {
    std::fs::create_dir_all(dest.parent().expect("dir")).expect("dir");
    std::fs::write(dest.with_file_name("p.bin.partial"), &bytes[..kept]).expect("partial");
    let meta = serde_json::json!({"url": url, "etag": "\"v1\"", "last_modified": null});
    std::fs::write(dest.with_file_name("p.bin.partial.json"), meta.to_string()).expect("meta");
}

#[tokio::test]
async fn a_bad_content_range_is_refused_and_the_partial_discarded() {
    // The range starts at 0, not 400.
    let says = "bad Content-Range \"bytes 0-999/1000\" for a resume at byte 400 of 1000";
    let headers = "Content-Range: bytes 0-999/1000\r\n";
    resume_fails("206 Partial Content", headers, FailureKind::Protocol, says).await;
}

/// Resumes a download of 1000 bytes kept up to byte 400 from a server that
/// answers `status` with `headers` (and 1000 bytes); it must fail as `kind`
/// with a message ending in `says` and leave nothing behind.
async fn resume_fails(status: &str, headers: &str, kind: FailureKind, says: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let bytes = vec![7u8; 1000];
    let port = scripted_server(vec![response(status, headers, &bytes)]);
    let url = format!("http://127.0.0.1:{port}/p.bin");
    let dest = dir.path().join("job/p.bin");
    leave_partial(&dest, &url, &bytes, 400);
    let err = downloader(3)
        .fetch(&spec(url, &bytes), &dest, None)
        .await
        .expect_err("the resume must fail");
    assert_eq!(err.kind, kind, "{err}");
    assert!(err.message.ends_with(says), "{err}");
    assert!(leftovers(dest.parent().expect("dir")).is_empty());
}

#[tokio::test]
async fn a_416_discards_the_partial_and_starts_over() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bytes: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
    let port = scripted_server(vec![
        response(
            "416 Range Not Satisfiable",
            "Content-Range: bytes */1000\r\n",
            b"",
        ),
        response("200 OK", "ETag: \"v2\"\r\n", &bytes),
    ]);
    let url = format!("http://127.0.0.1:{port}/p.bin");
    let dest = dir.path().join("job/p.bin");
    leave_partial(&dest, &url, &bytes, 400);
    downloader(3)
        .fetch(&spec(url, &bytes), &dest, None)
        .await
        .expect("starts over after the 416");
    assert_eq!(std::fs::read(&dest).expect("dest"), bytes);
}

#[tokio::test]
async fn tokens_come_from_a_credentials_endpoint_that_checks_the_device_identity() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = common::pki::Pki::new(&dir.path().join("pki"));
    let (device_cert, device_key) = pki.client("dev-1");
    let stranger = common::pki::Pki::new(&dir.path().join("other-pki"));
    let (stranger_cert, stranger_key) = stranger.client("dev-1");
    let tls_port = common::services::free_port();
    let p = pki.dir.display();
    let nginx = Nginx::start_with(
        &dir.path().join("nginx"),
        &format!(
            "server {{ listen 127.0.0.1:{tls_port} ssl; ssl_certificate {p}/server.pem; ssl_certificate_key {p}/server.key;\n\
             ssl_client_certificate {p}/ca.pem; ssl_verify_client on;\n\
             location = /token {{ default_type application/json; return 200 '{{\"token\":\"t0ken\"}}'; }} }}"
        ),
    );
    std::fs::create_dir_all(nginx.www.join("auth")).expect("auth dir");
    let bytes = payload(&nginx, "auth/p.bin", 5000, 17);
    let options = |cert: &Path, key: &Path| DownloadOptions {
        ca_file: Some(pki.ca()),
        credentials_url: Some(format!("https://127.0.0.1:{tls_port}/token")),
        identity: Some((cert.to_path_buf(), key.to_path_buf())),
        attempts: 1,
        ..DownloadOptions::default()
    };
    let device = Downloader::new(options(&device_cert, &device_key)).expect("client");
    device
        .fetch(
            &spec(nginx.url("auth/p.bin"), &bytes),
            &dir.path().join("a"),
            None,
        )
        .await
        .expect("the token opens the URL");
    assert_eq!(std::fs::read(dir.path().join("a")).expect("dest"), bytes);

    let impostor = Downloader::new(options(&stranger_cert, &stranger_key)).expect("client");
    let err = impostor
        .fetch(
            &spec(nginx.url("auth/p.bin"), &bytes),
            &dir.path().join("b"),
            None,
        )
        .await
        .expect_err("refused");
    assert_eq!(err.kind, FailureKind::Unauthorized, "{err}");
    assert!(err.message.contains("credentials endpoint"), "{err}");
    assert!(!dir.path().join("b").exists());
}

#[tokio::test]
async fn a_pre_signed_query_reaches_the_server_byte_for_byte() {
    let dir = tempfile::tempdir().expect("tempdir");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listener");
    let port = listener.local_addr().expect("addr").port();
    let (tx, rx) = std::sync::mpsc::channel();
    let body = b"opaque".to_vec();
    let reply = response("200 OK", "", &body);
    std::thread::spawn(move || {
        if let Some(Ok(mut conn)) = listener.incoming().next() {
            use std::io::{Read, Write};
            let mut request = [0u8; 4096];
            let n = conn.read(&mut request).unwrap_or(0);
            let line = String::from_utf8_lossy(&request[..n])
                .lines()
                .next()
                .unwrap_or_default()
                .to_string();
            let _ = tx.send(line);
            let _ = conn.write_all(&reply);
        }
    });
    let query = "X-Amz-Credential=AKIA%2F20261123%2Feu-west-1&X-Amz-Date=20261123T000000Z&X-Amz-Signature=ab+cd%3D~_.";
    let url = format!("http://127.0.0.1:{port}/bucket/p.bin?{query}");
    downloader(1)
        .fetch(&spec(url, &body), &dir.path().join("p.bin"), None)
        .await
        .expect("download");
    let line = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("request line");
    assert_eq!(line, format!("GET /bucket/p.bin?{query} HTTP/1.1"));
}

#[tokio::test]
async fn a_whole_response_shorter_than_declared_fails_at_once_and_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nginx = Nginx::start(&dir.path().join("nginx"));
    let bytes = payload(&nginx, "p.bin", 1000, 19);
    let mut declared = spec(nginx.url("p.bin"), &bytes);
    declared.size = 4096;
    let job = dir.path().join("job");
    let err = downloader(3)
        .fetch(&declared, &job.join("p.bin"), None)
        .await
        .expect_err("short");
    assert_eq!(err.kind, FailureKind::Mismatch, "{err}");
    assert_eq!(
        err.message, "payload.bin: the server sent 1000 of 4096 declared bytes",
        "{err}"
    );
    assert_eq!(
        nginx.requests(),
        vec![(200, "-".to_string())],
        "no retry, no range"
    );
    assert!(leftovers(&job).is_empty(), "{:?}", leftovers(&job));
}

#[tokio::test]
async fn a_body_cut_before_its_content_length_is_retried_and_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let head = b"HTTP/1.1 200 OK\r\nContent-Length: 4096\r\nConnection: close\r\n\r\n".to_vec();
    let cut = [head, vec![b'x'; 1000]].concat();
    let port = scripted_server(vec![cut.clone(), cut.clone(), cut]);
    let bytes = vec![b'x'; 4096];
    let says = "gave up after 3 attempts: the server sent 1000 of 4096 bytes, \
                then the connection broke: end of file before message length reached";
    fails_saying(3, port, &bytes, dir.path(), FailureKind::Network, says).await;
}

#[tokio::test]
async fn a_416_for_a_shorter_file_fails_at_once() {
    let says = "payload.bin: the server has 300 of 1000 declared bytes";
    let headers = "Content-Range: bytes */300\r\n";
    resume_fails(
        "416 Range Not Satisfiable",
        headers,
        FailureKind::Mismatch,
        says,
    )
    .await;
}

#[tokio::test]
async fn a_complete_partial_file_is_verified_without_asking_the_server() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nginx = Nginx::start(&dir.path().join("nginx"));
    let bytes = payload(&nginx, "p.bin", 50_000, 23);
    let dest = dir.path().join("job/p.bin");
    leave_partial(&dest, &nginx.url("p.bin"), &bytes, bytes.len());
    downloader(1)
        .fetch(&spec(nginx.url("p.bin"), &bytes), &dest, None)
        .await
        .expect("in place");
    assert_eq!(std::fs::read(&dest).expect("dest"), bytes);
    assert!(nginx.requests().is_empty(), "{:?}", nginx.requests());
    assert!(leftovers(dest.parent().expect("dir")).is_empty());
}

/// A pre-signed query whose values must never be seen outside the request.
const SIGNATURE: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f0SIGNATURE";
const SESSION: &str = "IQoJb3JpZ2luX2VjEXAMPLESESSIONTOKEN";

fn signed(base: &str) -> String {
    format!(
        "{base}?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAEXAMPLE%2F20261123&\
         X-Amz-Security-Token={SESSION}&X-Amz-Signature={SIGNATURE}"
    )
}

/// Log lines written while it runs, at every level.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        self.0
            .lock()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }
}

/// A server that sends `greeting` after a request, then nothing for 30 s.
fn silent_server(greeting: &'static [u8]) -> u16 {
    serve(move |mut conn| {
        let _ = std::io::Write::write_all(&mut conn, greeting);
        std::thread::sleep(Duration::from_secs(30));
    })
}

/// A server that sends 1000 of 100000 announced bytes, then resets the
/// connection (RST, not FIN).
fn resetting_server() -> u16 {
    serve(|mut conn| {
        use std::io::Write;
        use std::os::fd::AsRawFd;
        let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\nETag: \"e\"\r\n\r\n");
        let _ = conn.write_all(&[1u8; 1000]);
        std::thread::sleep(Duration::from_millis(50));
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: setsockopt reads `linger` (of the size given) only.
        unsafe {
            libc::setsockopt(
                conn.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&raw const linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            );
        }
    })
}

#[tokio::test]
async fn a_pre_signed_query_reaches_no_message_and_no_log_line_whatever_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broken = common::services::free_port();
    let nginx = Nginx::start_with(
        &dir.path().join("nginx"),
        &format!("server {{ listen 127.0.0.1:{broken}; location / {{ return 500; }} }}"),
    );
    let bytes = payload(&nginx, "p.bin", 100_000, 29);
    let closed = common::services::free_port();
    let cases = [
        (
            "closed port",
            format!("http://127.0.0.1:{closed}/p.bin"),
            "cannot connect: Connection refused",
        ),
        (
            "silent server",
            format!("http://127.0.0.1:{}/p.bin", silent_server(b"")),
            "the server sent no response for 500 ms",
        ),
        (
            "server error",
            format!("http://127.0.0.1:{broken}/p.bin"),
            "server error 500",
        ),
        ("expired", nginx.url("private/p.bin"), "403"),
        (
            "reset mid-body",
            format!("http://127.0.0.1:{}/p.bin", resetting_server()),
            "the server sent 1000 of 100000 bytes, then the connection broke: Connection reset by peer",
        ),
        (
            "cut mid-body",
            format!(
                "http://127.0.0.1:{}/p.bin",
                cutting_proxy(nginx.port, vec![5000, 5000])
            ),
            "the server sent",
        ),
    ];
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let d = downloader(2);
    for (n, (what, base, expected)) in cases.iter().enumerate() {
        let url = signed(base);
        let file = spec(url.clone(), &bytes);
        let err = d
            .fetch(&file, &dir.path().join(format!("job/{n}")), None)
            .await
            .expect_err(what);
        assert!(err.message.contains(expected), "{what}: {err}");
        let manifest = d
            .fetch_document(
                &url,
                &"0".repeat(64),
                1 << 20,
                &dir.path().join(format!("m{n}")),
            )
            .await
            .expect_err(what);
        for text in [err.to_string(), manifest.to_string()] {
            assert!(
                !text.contains(SIGNATURE) && !text.contains(SESSION) && !text.contains("X-Amz"),
                "{what}: {text}"
            );
        }
    }
    let logs = captured.text();
    assert!(logs.contains("download interrupted"), "{logs}");
    assert!(
        !logs.contains(SIGNATURE) && !logs.contains(SESSION) && !logs.contains("X-Amz"),
        "{logs}"
    );
}

#[tokio::test]
async fn the_device_token_reaches_only_the_hosts_named_for_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = common::pki::Pki::new(&dir.path().join("pki"));
    let (cert, key) = pki.client("dev-1");
    let (tls_port, named, other) = (
        common::services::free_port(),
        common::services::free_port(),
        common::services::free_port(),
    );
    let root = dir.path().join("nginx");
    let (p, r) = (pki.dir.display(), root.display());
    let nginx = Nginx::start_with(
        &root,
        &format!(
            "log_format bearer '$server_addr:$server_port $http_authorization';\n\
             server {{ listen 127.0.0.1:{tls_port} ssl; ssl_certificate {p}/server.pem; ssl_certificate_key {p}/server.key;\n\
             ssl_client_certificate {p}/ca.pem; ssl_verify_client on;\n\
             location = /token {{ default_type application/json; return 200 '{{\"token\":\"dev1ce-t0ken\"}}'; }} }}\n\
             server {{ listen 127.0.0.1:{named}; listen 127.0.0.1:{other}; listen 127.0.0.2:{other};\n\
             root {r}/www; access_log {r}/bearer.log bearer; }}"
        ),
    );
    let bytes = payload(&nginx, "p.bin", 5000, 31);
    let device = |hosts: Option<&str>| {
        let config = dir.path().join("device.toml");
        std::fs::write(
            &config,
            format!(
                "[mqtt]\ncert_file = {cert:?}\nkey_file = {key:?}\n[download]\nca_file = {:?}\n\
                 credentials_url = \"https://127.0.0.1:{tls_port}/token\"\n{}",
                pki.ca(),
                hosts
                    .map(|h| format!("credentials_hosts = {h}"))
                    .unwrap_or_default()
            ),
        )
        .expect("device.toml");
        let config = otabox::config::DeviceConfig::load(&config).expect("config");
        Downloader::new(config.download.options(&config.mqtt)).expect("client")
    };
    let fetch_all = |d: Downloader, tag: &'static str| {
        let (dir, bytes) = (dir.path().to_path_buf(), bytes.clone());
        async move {
            for (n, host) in [
                format!("127.0.0.1:{named}"),
                format!("127.0.0.1:{other}"),
                format!("127.0.0.2:{other}"),
            ]
            .iter()
            .enumerate()
            {
                let file = spec(format!("http://{host}/p.bin?X-Amz-Signature=s"), &bytes);
                d.fetch(&file, &dir.join(format!("{tag}/{n}")), None)
                    .await
                    .expect("no token needed");
            }
        }
    };
    fetch_all(device(None), "default").await;
    fetch_all(device(Some(&format!("[\"127.0.0.1:{named}\"]"))), "named").await;
    let seen = std::fs::read_to_string(dir.path().join("nginx/bearer.log")).expect("log");
    let with_token: Vec<&str> = seen
        .lines()
        .filter(|l| l.ends_with("Bearer dev1ce-t0ken"))
        .map(|l| l.split(' ').next().unwrap_or_default())
        .collect();
    let (n, o) = (format!("127.0.0.1:{named}"), format!("127.0.0.1:{other}"));
    assert_eq!(
        with_token,
        [n.as_str(), o.as_str(), n.as_str()],
        "default: any port of the endpoint's host; named: that host and port only\n{seen}"
    );
    assert_eq!(seen.lines().count(), 6, "{seen}");
    let err = Downloader::new(DownloadOptions {
        credentials_url: Some(format!("https://127.0.0.1:{tls_port}/token")),
        identity: Some((cert.clone(), key.clone())),
        credentials_hosts: Some(vec!["https://127.0.0.1".into()]),
        ..DownloadOptions::default()
    })
    .err()
    .expect("a URL is not a host");
    assert!(err.to_string().contains("credentials_hosts"), "{err}");
}

/// The modes of everything under `root` that group or others may use. The
/// agent is still running: a file it replaces (write to a temporary name,
/// rename) may be gone between the listing and its `stat`.
fn open_to_others(root: &Path) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let mut open = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(path) = todo.pop() {
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => panic!("stat {}: {e}", path.display()),
        };
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            open.push(format!("{:o} {}", mode, path.display()));
        }
        if meta.is_dir() {
            match std::fs::read_dir(&path) {
                Ok(entries) => todo.extend(entries.flatten().map(|e| e.path())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => panic!("list {}: {e}", path.display()),
            }
        }
    }
    open
}

#[test]
fn through_the_agent_tokens_and_signatures_stay_in_the_request() {
    use common::services::{AgentProcess, Mosquitto, TestClient};
    use std::os::unix::fs::PermissionsExt;
    let wait = Duration::from_secs(60);
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Mosquitto::start(&dir.path().join("broker"));
    let nginx = Nginx::start(&dir.path().join("nginx"));
    std::fs::create_dir_all(nginx.www.join("auth")).expect("auth dir");
    let content = b"greeting = 1\n";
    std::fs::write(nginx.www.join("auth/app.conf"), content).expect("payload");
    let config = common::file_device(
        dir.path(),
        "dev-1",
        &format!("port = {}\n[download]\nattempts = 2", broker.port),
    );
    // State left by an older agent, open to others.
    let state = dir.path().join("state");
    std::fs::create_dir_all(state.join("jobs/old")).expect("state");
    std::fs::write(state.join("trust-root.json"), "{}").expect("file");
    std::fs::write(state.join("jobs/old/note"), "x").expect("file");
    for (path, mode) in [
        (state.clone(), 0o755),
        (state.join("jobs"), 0o755),
        (state.join("jobs/old"), 0o755),
        (state.join("trust-root.json"), 0o644),
        (state.join("jobs/old/note"), 0o644),
    ] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }
    let cloud = TestClient::connect(broker.port, "cloud", &["state/dev-1/update"]);
    let agent = AgentProcess::start_with_env(&config, &[("OTABOX_LOG", "debug")]);
    cloud.wait_for(wait, "the agent online", |m| {
        m.json
            .pointer("/state/reported/deployment/agent/state")
            .is_some()
    });
    let deploy = |version: u64, job: &str, url: String, content: &[u8]| {
        let delta = serde_json::json!({"version": version, "state": {"deployment": {
            "schema": 1, "jobId": job, "version": job,
            "steps": [{"updateType": "otabox/file:1",
                "manifest": {"name": "app", "version": job, "payload": "app.conf",
                             "destination": "/var/lib/otabox/files/app.conf"},
                "files": [{"name": "app.conf", "url": url, "size": content.len(),
                           "sha256": sha256_hex(content), "token": "t0ken"}]}]}}});
        cloud.publish("state/dev-1/update/delta", delta.to_string());
        cloud.collect_until(wait, "the ack", |m| {
            m.json.get("jobId").and_then(|j| j.as_str()) == Some(job)
                && m.json.get("status").is_some()
        })
    };
    let mut seen = deploy(1, "job-ok", signed(&nginx.url("auth/app.conf")), content);
    assert_eq!(
        seen.last().map(|m| m.json["status"].clone()),
        Some(serde_json::json!("SUCCESS")),
        "{}",
        agent.log()
    );
    let closed = common::services::free_port();
    seen.extend(deploy(
        2,
        "job-down",
        signed(&format!("http://127.0.0.1:{closed}/app.conf")),
        // Other bytes than installed, so the agent must fetch them.
        b"never served\n",
    ));
    assert_eq!(
        seen.last().map(|m| m.json["status"].clone()),
        Some(serde_json::json!("FAILURE"))
    );
    let reports: Vec<String> = seen.iter().map(|m| m.json.to_string()).collect();
    let failure = reports
        .iter()
        .find(|r| r.contains("gave up after 2 attempts"))
        .unwrap_or_else(|| panic!("no failure message: {reports:#?}"));
    assert!(
        failure.contains("cannot connect: Connection refused"),
        "{failure}"
    );
    let log = agent.log();
    assert!(log.contains("download interrupted"), "{log}");
    for secret in [SIGNATURE, SESSION, "X-Amz", "t0ken"] {
        assert!(!log.contains(secret), "{secret} in the log:\n{log}");
        for report in &reports {
            assert!(!report.contains(secret), "{secret} in a report: {report}");
        }
    }
    let journal = std::fs::read_to_string(state.join("jobs/job-ok/journal.json")).expect("journal");
    assert!(
        journal.contains("t0ken"),
        "the token is journaled (privately)"
    );
    assert_eq!(open_to_others(&state), Vec::<String>::new());
}
