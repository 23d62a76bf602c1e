//! Invalid flags, env vars and unusable addresses: fast, non-zero exit with
//! exactly one `error:` line on stderr and no `listening` line.

mod support;

use support::*;

/// Runs the proxy with `args` after safe defaults (each default left out if
/// `args` sets the flag), expecting it to exit within 5s.
fn run_bad(args: &[&str], env: &[(&str, &str)]) -> CmdOutput {
    let closed = closed_port().to_string();
    let mut full: Vec<String> = Vec::new();
    for (flag, value) in [
        ("--listen", "127.0.0.1:0"),
        ("--admin-listen", "127.0.0.1:0"),
        ("--upstream", closed.as_str()),
    ] {
        let set_by_args = args
            .iter()
            .any(|a| *a == flag || a.starts_with(&format!("{flag}=")));
        let set_by_env = env.iter().any(|(k, _)| *k == env_name(flag));
        if !set_by_args && !set_by_env {
            full.push(flag.into());
            full.push(value.into());
        }
    }
    full.extend(args.iter().map(|s| s.to_string()));
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    run_cmd_blocking(&full, &env, secs(5))
}

#[track_caller]
fn assert_rejected(out: &CmdOutput, code: i32, mentions: &[&str]) {
    assert_eq!(out.status.code(), Some(code), "exit code; output: {out:?}");
    assert!(out.elapsed < secs(5), "took {:?}", out.elapsed);
    let errors: Vec<&str> = out
        .stderr_lines()
        .into_iter()
        .filter(|l| l.starts_with("error:"))
        .collect();
    assert_eq!(
        errors.len(),
        1,
        "exactly one stderr line starting with `error:`; stderr:\n{}",
        out.stderr
    );
    let line = errors[0];
    assert!(
        mentions.iter().any(|m| line.contains(m)),
        "the error line should name one of {mentions:?}: {line:?}"
    );
    assert!(
        !out.stderr.contains("\"listening\""),
        "nothing may be listening; stderr:\n{}",
        out.stderr
    );
}

#[test]
fn unparsable_listen_address_exits_2() {
    let out = run_bad(&["--listen", "not-an-address"], &[]);
    assert_rejected(&out, 2, &["--listen"]);
}

#[test]
fn unknown_mode_exits_2() {
    let out = run_bad(&["--mode", "udp"], &[]);
    assert_rejected(&out, 2, &["--mode"]);
}

#[test]
fn unknown_upstream_protocol_exits_2() {
    let out = run_bad(&["--upstream-protocol", "http3"], &[]);
    assert_rejected(&out, 2, &["--upstream-protocol"]);
}

#[test]
fn drain_timeout_smaller_than_drain_delay_exits_2() {
    let out = run_bad(&["--drain-delay", "10s", "--drain-timeout", "5s"], &[]);
    assert_rejected(&out, 2, &["--drain-timeout"]);
}

#[test]
fn unparsable_duration_exits_2() {
    let out = run_bad(&["--drain-delay", "banana"], &[]);
    assert_rejected(&out, 2, &["--drain-delay"]);
}

#[test]
fn unparsable_max_connections_exits_2() {
    let out = run_bad(&["--max-connections", "lots"], &[]);
    assert_rejected(&out, 2, &["--max-connections"]);
}

#[test]
fn unparsable_log_format_exits_2() {
    let out = run_bad(&["--log-format", "xml"], &[]);
    assert_rejected(&out, 2, &["--log-format"]);
}

#[test]
fn unknown_flag_exits_2() {
    let out = run_bad(&["--frobnicate", "yes"], &[]);
    assert_rejected(&out, 2, &["--frobnicate"]);
}

#[test]
fn bad_duration_in_env_var_exits_2() {
    let out = run_bad(&[], &[("LAMEDUCK_DRAIN_DELAY", "banana")]);
    assert_rejected(
        &out,
        2,
        &["--drain-delay", "LAMEDUCK_DRAIN_DELAY", "drain-delay"],
    );
}

#[test]
fn drain_timeout_below_delay_via_env_exits_2() {
    let out = run_bad(
        &[],
        &[
            ("LAMEDUCK_DRAIN_DELAY", "10s"),
            ("LAMEDUCK_DRAIN_TIMEOUT", "1s"),
        ],
    );
    assert_rejected(
        &out,
        2,
        &["--drain-timeout", "LAMEDUCK_DRAIN_TIMEOUT", "drain-timeout"],
    );
}

#[test]
fn listen_address_in_use_exits_1_and_names_the_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = run_bad(&["--listen", &addr], &[]);
    assert_rejected(&out, 1, &[&addr]);
    drop(taken);
}

#[test]
fn admin_address_in_use_exits_1_and_names_the_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = run_bad(&["--admin-listen", &addr], &[]);
    assert_rejected(&out, 1, &[&addr]);
    drop(taken);
}

#[test]
fn kubernetes_on_without_a_configuration_or_identity_fails_start_up_and_says_what_is_missing() {
    // No kubeconfig, no in-cluster environment (base_command clears them).
    let home = tempfile::tempdir().unwrap();
    let home = home.path().to_str().unwrap();
    let out = run_bad(&["--kubernetes", "on"], &[("HOME", home)]);
    assert_rejected(&out, 1, &["--kubernetes on", "no Kubernetes configuration"]);

    // A kubeconfig, but no pod identity from the downward API.
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("config");
    std::fs::write(&kubeconfig, "apiVersion: v1\nkind: Config\n").unwrap();
    let out = run_bad(
        &["--kubernetes", "on"],
        &[("HOME", home), ("KUBECONFIG", kubeconfig.to_str().unwrap())],
    );
    assert_rejected(
        &out,
        1,
        &["--kubernetes on", "POD_NAME is not set", "metadata.name"],
    );
}
