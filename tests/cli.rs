//! Commands and configuration sources: `run`, env vars, `demo-app`, `demo`.

mod support;

use std::time::Instant;

use nix::sys::signal::Signal;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_subcommand_behaves_like_the_default_command() {
    let app = TestApp::start().await;
    let up = app.addr.to_string();
    let ld = Lameduck::spawn_subcommand("run", &["--upstream", &up]);
    wait_ready(ld.admin_addr(), secs(10)).await;
    let r = http_get(ld.proxy_addr(), "/").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "hello from the test app\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flags_can_be_given_as_lameduck_env_vars() {
    let app = TestApp::start().await;
    let up = app.addr.to_string();
    let mut ld = Lameduck::spawn_with_env(
        &[],
        &[
            ("LAMEDUCK_UPSTREAM", &up),
            ("LAMEDUCK_DRAIN_DELAY", "1s"),
            ("LAMEDUCK_DRAIN_TIMEOUT", "3s"),
        ],
    );
    wait_ready(ld.admin_addr(), secs(10)).await;
    assert_eq!(
        http_get(ld.proxy_addr(), "/").await.status,
        200,
        "LAMEDUCK_UPSTREAM used"
    );
    let t = Instant::now();
    ld.signal(Signal::SIGTERM);
    assert_eq!(ld.wait_exit(secs(6)).await.code(), Some(0));
    assert_between(
        t.elapsed(),
        ms(900),
        secs(3),
        "LAMEDUCK_DRAIN_DELAY=1s used",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flags_win_over_env_vars() {
    let app = TestApp::start().await;
    let up = app.addr.to_string();
    let wrong = closed_port().to_string();
    let ld = Lameduck::spawn_with_env(&["--upstream", &up], &[("LAMEDUCK_UPSTREAM", &wrong)]);
    wait_ready(ld.admin_addr(), secs(10)).await;
    assert_eq!(http_get(ld.proxy_addr(), "/").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_app_serves_the_contract_endpoints() {
    let app = DemoApp::start().await;
    let a = app.addr;
    let r = http_get(a, "/").await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "hello from the demo app\n")
    );
    let r = http_get(a, "/slow?ms=100").await;
    assert_eq!((r.status, r.text().as_str()), (200, "slept 100 ms\n"));
    let r = http_get(a, "/bytes?n=10").await;
    assert_eq!((r.status, r.text().as_str()), (200, "xxxxxxxxxx"));
    let r = http_request(a, "POST", "/echo", &[], b"echo me")
        .await
        .unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "echo me"));
    let r = http_request(a, "GET", "/headers", &[("x-probe", "42")], b"")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert!(r.text().lines().any(|l| l == "x-probe: 42"), "{}", r.text());
    assert_eq!(http_get(a, "/healthz").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_in_front_of_the_demo_app_passes_its_answers_through() {
    let app = DemoApp::start().await;
    let up = app.addr.to_string();
    let ld = Lameduck::spawn(&["--upstream", &up]);
    wait_ready(ld.admin_addr(), secs(10)).await;
    let r = http_get(ld.proxy_addr(), "/").await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "hello from the demo app\n")
    );
    let r = http_get(ld.proxy_addr(), "/slow?ms=50").await;
    assert_eq!((r.status, r.text().as_str()), (200, "slept 50 ms\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_runs_the_sample_app_behind_the_proxy_and_prints_curl_commands() {
    let ld = Lameduck::spawn_subcommand("demo", &[]);
    wait_ready(ld.admin_addr(), secs(10)).await;
    let r = http_get(ld.proxy_addr(), "/").await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "hello from the demo app\n")
    );
    let port = ld.proxy_addr().port().to_string();
    let deadline = Instant::now() + secs(3);
    loop {
        let out = ld.stdout();
        if out.contains("curl") && out.contains(&port) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "stdout should show curl commands for the proxy port {port}; got:\n{out}"
        );
        tokio::time::sleep(ms(20)).await;
    }
}

#[test]
fn text_log_format_writes_human_lines_not_json() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let mut child = base_command()
        .args([
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--upstream",
            &closed_port().to_string(),
            "--log-format",
            "text",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + secs(10);
    let mut seen = Vec::new();
    let found = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let hit = line.contains("listening");
                seen.push(line.clone());
                if hit {
                    break Some(line);
                }
            }
            Err(_) => break None,
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    let line = found.unwrap_or_else(|| panic!("no `listening` line in text mode: {seen:?}"));
    assert!(
        serde_json::from_str::<serde_json::Value>(&line).is_err(),
        "--log-format text must not write JSON: {line}"
    );
}

/// Runs the proxy without `--log-format` for ~1 s and returns what it wrote;
/// `terminal` puts its stderr on a pseudo-terminal (util-linux `script`).
fn default_format_output(terminal: bool) -> String {
    let closed = closed_port().to_string();
    let proxy = [
        BIN,
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--upstream",
        &closed,
        "--drain-delay",
        "0s",
        "--metrics-linger",
        "0s",
    ];
    // SIGTERM after 1 s: the proxy drains at once and exits 0. --foreground:
    // otherwise timeout also signals its whole process group, the proxy gets
    // a second SIGTERM, and may take it as "force the exit" (status 4).
    let mut run = vec![
        "timeout",
        "--foreground",
        "--preserve-status",
        "-s",
        "TERM",
        "1",
    ];
    run.extend_from_slice(&proxy);
    let mut cmd = if terminal {
        let mut script = std::process::Command::new("script");
        script.args(["-q", "-e", "-c", &run.join(" "), "/dev/null"]);
        script
    } else {
        let mut direct = std::process::Command::new(run[0]);
        direct.args(&run[1..]);
        direct
    };
    for var in ["LAMEDUCK_LOG_FORMAT", "RUST_LOG"] {
        cmd.env_remove(var);
    }
    let out = cmd.output().expect("run the proxy");
    // `script` copies the terminal's output to its stdout.
    let text =
        String::from_utf8_lossy(if terminal { &out.stdout } else { &out.stderr }).to_string();
    assert!(out.status.success(), "{:?}: {text}", out.status);
    text
}

#[test]
fn logs_default_to_json_when_stderr_is_not_a_terminal_and_to_text_when_it_is() {
    let piped = default_format_output(false);
    let listening = piped
        .lines()
        .find(|l| l.contains("listening"))
        .expect("listening line");
    assert!(
        serde_json::from_str::<serde_json::Value>(listening).is_ok(),
        "{listening}"
    );

    let terminal = default_format_output(true);
    let listening = terminal
        .lines()
        .find(|l| l.contains("listening"))
        .unwrap_or_else(|| panic!("no listening line on the terminal: {terminal}"));
    assert!(
        serde_json::from_str::<serde_json::Value>(listening.trim()).is_err(),
        "JSON on a terminal: {listening}"
    );
    assert!(listening.contains("INFO"), "{listening}");
}
