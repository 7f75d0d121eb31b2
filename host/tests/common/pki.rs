//! A throwaway PKI made with the openssl command line: a CA, a server
//! certificate for 127.0.0.1, and client certificates (CN = identity) with
//! the clientAuth usage that rustls requires.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Certificates in a directory.
pub struct Pki {
    /// The directory.
    pub dir: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is installed");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Pki {
    /// Creates the CA and the server certificate.
    pub fn new(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).expect("pki dir");
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=otabox-test-ca",
            ],
        );
        let pki = Self {
            dir: dir.to_path_buf(),
        };
        pki.issue(
            "server",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        );
        pki
    }

    /// Issues a client certificate for `identity`.
    pub fn client(&self, identity: &str) -> (PathBuf, PathBuf) {
        self.issue(identity, "extendedKeyUsage=clientAuth\n")
    }

    fn issue(&self, name: &str, ext: &str) -> (PathBuf, PathBuf) {
        let ext_file = format!("{name}.ext");
        std::fs::write(self.dir.join(&ext_file), ext).expect("ext file");
        let (key, csr, pem) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
        );
        openssl(
            &self.dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                &format!("/CN={name}"),
            ],
        );
        openssl(
            &self.dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                &ext_file,
            ],
        );
        (self.dir.join(pem), self.dir.join(key))
    }

    /// mosquitto config lines for mutual TLS: the CN of a client
    /// certificate is its user name, checked against `acl`.
    pub fn mosquitto_mtls(&self, acl: &Path) -> String {
        let p = self.dir.display();
        format!(
            "cafile {p}/ca.pem\ncertfile {p}/server.pem\nkeyfile {p}/server.key\nrequire_certificate true\n\
             use_identity_as_username true\nacl_file {}\n",
            acl.display()
        )
    }

    /// The `otabox replica` arguments for mutual TLS with `cert` and `key`.
    pub fn replica_args(&self, cert: &Path, key: &Path) -> Vec<String> {
        [
            "--ca-file".to_string(),
            self.ca().display().to_string(),
            "--cert-file".into(),
            cert.display().to_string(),
            "--key-file".into(),
            key.display().to_string(),
        ]
        .to_vec()
    }

    /// The CA certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
}
