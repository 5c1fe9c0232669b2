//! A stock Python STOMP client (stomp.py, from PyPI) over TCP: frames,
//! receipts, queue acks, NACK redelivery, header escaping and binary bodies
//! as a third-party client library speaks them.

use std::path::PathBuf;
use std::time::Duration;

use crate::helpers::*;

/// Installs tests/stomp_py/requirements.txt (pinned) into target/python,
/// unless it is there: `pip install --target`, which changes nothing else.
fn stomp_py_installed() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let target = root.join("target").join("python");
    if !target.join("stomp").join("__init__.py").exists() {
        let status = std::process::Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(["--no-deps", "--target"])
            .arg(&target)
            .arg("-r")
            .arg(root.join("tests/stomp_py/requirements.txt"))
            .status()
            .expect("this test needs Python 3 with pip (README \"Test it\")");
        assert!(status.success(), "pip install of stomp.py failed");
    }
    target
}

#[tokio::test]
async fn stomp_py_sends_acks_nacks_and_escapes_against_a_node() {
    let site = stomp_py_installed();
    let cluster = Cluster::start_stomp(1, AuthKind::Jwt, |_, _| {}).await;
    let addr = cluster.stomp_addr(0);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/stomp_py/scenarios.py");
    let run = tokio::process::Command::new("python3")
        .arg(&script)
        .args([
            addr.ip().to_string(),
            addr.port().to_string(),
            API_KEY.into(),
        ])
        .env("PYTHONPATH", &site)
        .kill_on_drop(true)
        .output();
    let output = within(Duration::from_secs(60), run).await.unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "stomp.py scenarios failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("ok marked redelivered"), "{stdout}");
    assert!(stdout.contains("ok no ERROR frame"), "{stdout}");
    cluster.finish().await;
}
