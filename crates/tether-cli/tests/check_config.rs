//! `tether check-config` on good and bad files: exit code, and an error line naming file, line
//! and key.
// Test helpers panic on failure by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(20);

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "tether-check-config-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `tether check-config FILE`, killing it if it outlives [`LIMIT`].
fn check(file: &Path) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tether"))
        .arg("check-config")
        .arg(file)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("check-config did not finish in {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

/// Asserts exit 64 and one stderr line `FILE:LINE: KEY: …`; returns the message part.
fn assert_rejected(file: &Path, line: usize, key: &str) -> String {
    let out = check(file);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(64), "stderr: {stderr}");
    assert!(out.stdout.is_empty());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    let prefix = format!("{}:{line}: {key}: ", file.display());
    assert!(
        stderr.starts_with(&prefix),
        "expected {prefix:?}, got {stderr:?}"
    );
    stderr[prefix.len()..].trim_end().to_owned()
}

const GOOD: &str = r#"[[listeners]]
address = "127.0.0.1:0"
protocols = ["http1", "h2c"]

  [[listeners.routes]]
  path_prefix = "/"
  upstream = "app"
  timeout = "30s"

[[upstreams]]
name = "app"
addresses = ["127.0.0.1:9000"]
"#;

#[test]
fn good_file_prints_ok() {
    let dir = TempDir::new();
    let out = check(&dir.write("good.toml", GOOD));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n");
}

#[test]
fn shipped_example_is_valid() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/tether.toml");
    let out = check(&example);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn tls_listener_with_relative_pem_paths() {
    let dir = TempDir::new();
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    for f in ["cert.pem", "key.pem"] {
        std::fs::copy(data.join(f), dir.0.join(f)).unwrap();
    }
    let text = GOOD.replace(
        "protocols = [\"http1\", \"h2c\"]",
        "protocols = [\"http1\", \"h2\"]\ntls = { cert = \"cert.pem\", key = \"key.pem\" }",
    );
    let out = check(&dir.write("tls.toml", &text));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn garbage_cert_names_the_key() {
    let dir = TempDir::new();
    dir.write("cert.pem", "not a certificate\n");
    let text = GOOD.replace(
        "protocols = [\"http1\", \"h2c\"]",
        "tls = { cert = \"cert.pem\", key = \"key.pem\" }",
    );
    let msg = assert_rejected(&dir.write("c.toml", &text), 3, "listeners[0].tls.cert");
    assert!(msg.contains("cert.pem"), "{msg}");
}

#[test]
fn unknown_key() {
    let dir = TempDir::new();
    let text = GOOD.replace("  timeout = \"30s\"", "  timeout = \"30s\"\n  retry = 3");
    let msg = assert_rejected(
        &dir.write("c.toml", &text),
        9,
        "listeners[0].routes[0].retry",
    );
    assert!(msg.contains("unknown field"), "{msg}");
}

#[test]
fn bad_duration() {
    let dir = TempDir::new();
    let text = GOOD.replace("\"30s\"", "\"30 sec\"");
    let msg = assert_rejected(
        &dir.write("c.toml", &text),
        8,
        "listeners[0].routes[0].timeout",
    );
    assert!(msg.contains("unit"), "{msg}");
}

#[test]
fn route_to_missing_upstream() {
    let dir = TempDir::new();
    let text = GOOD.replace("upstream = \"app\"", "upstream = \"api\"");
    let msg = assert_rejected(
        &dir.write("c.toml", &text),
        7,
        "listeners[0].routes[0].upstream",
    );
    assert!(msg.contains("\"api\""), "{msg}");
}

#[test]
fn toml_syntax_error() {
    let dir = TempDir::new();
    let text = GOOD.replace("name = \"app\"", "name = \"app");
    let file = dir.write("c.toml", &text);
    let out = check(&file);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with(&format!("{}:11: ", file.display())),
        "{stderr}"
    );
}

#[test]
fn missing_file() {
    let dir = TempDir::new();
    let msg = assert_rejected(&dir.0.join("absent.toml"), 0, "file");
    assert!(msg.contains("cannot read"), "{msg}");
}

#[test]
fn passive_health_settings() {
    let dir = TempDir::new();
    let good = format!("{GOOD}max_fails = 3\nfail_timeout = \"5s\"\n");
    let out = check(&dir.write("good.toml", &good));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let zero = format!("{GOOD}fail_timeout = \"0s\"\n");
    let msg = assert_rejected(
        &dir.write("zero.toml", &zero),
        13,
        "upstreams[0].fail_timeout",
    );
    assert!(msg.contains("max_fails = 0"), "{msg}");
}

#[test]
fn tls_listener_with_more_certificates_and_client_certificates() {
    let dir = TempDir::new();
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    for f in ["cert.pem", "key.pem"] {
        std::fs::copy(data.join(f), dir.0.join(f)).unwrap();
    }
    let with = |tls: &str| {
        GOOD.replace(
            "protocols = [\"http1\", \"h2c\"]",
            &format!("tls = {{ cert = \"cert.pem\", key = \"key.pem\", {tls} }}"),
        )
    };
    let good = with(
        "certificates = [{ cert = \"cert.pem\", key = \"key.pem\" }], client_ca = \"cert.pem\", client_auth = \"optional\"",
    );
    let out = check(&dir.write("good.toml", &good));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (tls, key, why) in [
        (
            "client_ca = \"cert.pem\", client_auth = \"sometimes\"",
            "listeners[0].tls.client_auth",
            "\"required\" or \"optional\"",
        ),
        (
            "client_auth = \"required\"",
            "listeners[0].tls.client_auth",
            "need client_ca",
        ),
        (
            "client_ca = \"missing.pem\"",
            "listeners[0].tls.client_ca",
            "missing.pem",
        ),
        (
            "certificates = [{ cert = \"cert.pem\", key = \"missing.pem\" }]",
            "listeners[0].tls.certificates[0].key",
            "missing.pem",
        ),
    ] {
        let msg = assert_rejected(&dir.write("bad.toml", &with(tls)), 3, key);
        assert!(msg.contains(why), "{tls}: {msg}");
    }
}
