//! The alert rules, the Alertmanager example and the Grafana dashboards, checked with the real
//! tools: `promtool check rules` and `promtool test rules` (every alert fires and stays silent
//! where it should), `amtool check-config`, the dashboards' type-check against
//! `@grafana/schema` (dashboards/check/run.sh), every query parsed by `promql-parser`, house
//! rules (labels, annotations, runbooks, variables), and finally every dashboard query and
//! rule expression run against a real Prometheus scraping tests/fixtures/onsip-metrics.prom,
//! where OnsipAddressOffline must go pending for a phone that drops.
//!
//! A missing tool (promtool, amtool, prometheus, node, npm) fails the test: scripts/test.sh
//! installs them.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::prometheus::Prometheus;
use common::promql::{
    alert_rules, dashboard_files, dashboard_panels, dashboard_queries, files_with_suffix,
    instant_query, parse_all, query_returns_data, read_dashboard, repo_path, rule_exprs,
    substitute_grafana_vars,
};
use common::promql::{
    all_rule_files, grafana_vars, queries_and_rules_problems, substituted_dashboard_queries,
    write_shortened_rules, JOB,
};
use common::wait::find_binary;

/// Where every alert's runbook_url must point: this base + `<AlertName>.md`.
const RUNBOOK_BASE: &str =
    "https://github.com/onsip-ua-exporter/onsip-ua-exporter/blob/main/runbooks/";

/// Runs a command that must succeed; returns (stdout, stdout + stderr).
fn run_split(cmd: &mut Command) -> (String, String) {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("could not run {shown}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let text = format!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "{shown} failed ({}):\n{text}",
        out.status
    );
    (stdout, text)
}

/// Runs a command that must succeed; returns its stdout and stderr.
fn run(cmd: &mut Command) -> String {
    run_split(cmd).1
}

fn all_alerts() -> Vec<common::promql::AlertRule> {
    all_rule_files()
        .iter()
        .flat_map(|f| alert_rules(f))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// promtool and amtool
// ---------------------------------------------------------------------------------------------

#[test]
fn promtool_check_rules_accepts_every_rule_file() {
    let promtool = find_binary("PROMTOOL_BIN", "promtool");
    let out = run(Command::new(promtool)
        .args(["check", "rules"])
        .args(all_rule_files()));
    assert!(!out.contains("FAILED"), "{out}");
}

#[test]
fn promtool_unit_tests_pass() {
    let promtool = find_binary("PROMTOOL_BIN", "promtool");
    let dir = repo_path("alerts/tests");
    let tests = files_with_suffix(&dir, ".yml");
    assert!(
        tests.len() >= 4,
        "expected the promtool tests in alerts/tests: {tests:?}"
    );
    // Run from the tests' folder: their rule_files paths are relative to it.
    let out = run(Command::new(promtool)
        .args(["test", "rules"])
        .args(tests.iter().map(|t| t.file_name().unwrap()))
        .current_dir(&dir));
    assert!(!out.contains("FAILED"), "{out}");
}

#[test]
fn every_alert_has_promtool_cases_that_fire_and_stay_silent() {
    let mut firing: BTreeSet<String> = BTreeSet::new();
    let mut silent: BTreeSet<String> = BTreeSet::new();
    for file in files_with_suffix(&repo_path("alerts/tests"), ".yml") {
        let text = std::fs::read_to_string(&file).unwrap();
        let doc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
        for test in doc["tests"].as_sequence().into_iter().flatten() {
            for case in test["alert_rule_test"].as_sequence().into_iter().flatten() {
                let name = case["alertname"].as_str().unwrap_or_default().to_string();
                match case["exp_alerts"].as_sequence() {
                    Some(alerts) if !alerts.is_empty() => firing.insert(name),
                    _ => silent.insert(name),
                };
            }
        }
    }
    let mut missing = Vec::new();
    for alert in all_alerts() {
        if !firing.contains(&alert.name) {
            missing.push(format!("{}: no case where it fires", alert.name));
        }
        if !silent.contains(&alert.name) {
            missing.push(format!("{}: no case where it stays silent", alert.name));
        }
    }
    assert!(
        missing.is_empty(),
        "alerts/tests/*.yml:\n{}",
        missing.join("\n")
    );
}

#[test]
fn amtool_accepts_the_alertmanager_example_and_routes_by_severity() {
    let amtool = find_binary("AMTOOL_BIN", "amtool");
    let config = repo_path("alerts/alertmanager.example.yml");
    let out = run(Command::new(&amtool).arg("check-config").arg(&config));
    assert!(out.contains("SUCCESS"), "{out}");
    for (labels, receiver) in [
        (
            ["severity=critical", "alertname=OnsipAddressOffline"],
            "page",
        ),
        (
            ["severity=warning", "alertname=OnsipAddressFlapping"],
            "ticket",
        ),
    ] {
        let (out, _) = run_split(
            Command::new(&amtool)
                .args(["config", "routes", "test"])
                .arg(format!("--config.file={}", config.display()))
                .args(labels),
        );
        let got = out.trim();
        assert_eq!(got, receiver, "{labels:?} routed to {got:?}:\n{out}");
    }
}

#[test]
fn inhibit_rules_name_real_alerts_and_mute_per_phone_alerts() {
    let text = std::fs::read_to_string(repo_path("alerts/alertmanager.example.yml")).unwrap();
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let names: BTreeSet<String> = all_alerts().into_iter().map(|a| a.name).collect();
    let rules = doc["inhibit_rules"].as_sequence().expect("inhibit_rules");
    let mut pairs: Vec<(String, String, Vec<String>)> = Vec::new();
    for rule in rules {
        let alertnames = |key: &str| -> Vec<String> {
            let mut out = Vec::new();
            for m in rule[key].as_sequence().into_iter().flatten() {
                let m = m.as_str().unwrap_or_default();
                let Some(v) = m
                    .strip_prefix("alertname=~")
                    .or(m.strip_prefix("alertname="))
                else {
                    continue;
                };
                out.extend(v.trim_matches('"').split('|').map(str::to_string));
            }
            out
        };
        let equal: Vec<String> = rule["equal"]
            .as_sequence()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        let (sources, targets) = (alertnames("source_matchers"), alertnames("target_matchers"));
        for n in sources.iter().chain(&targets) {
            assert!(names.contains(n), "inhibit rule names unknown alert {n:?}");
        }
        for s in &sources {
            for t in &targets {
                pairs.push((s.clone(), t.clone(), equal.clone()));
            }
        }
    }
    let has = |s: &str, t: &str, eq: &[&str]| {
        pairs.iter().any(|(ps, pt, pe)| {
            ps == s && pt == t && pe.iter().map(String::as_str).eq(eq.iter().copied())
        })
    };
    assert!(has("OnsipDomainOutage", "OnsipAddressOffline", &["domain"]));
    for health in [
        "OnsipExporterDown",
        "OnsipExporterNotUp",
        "OnsipXmppDisconnected",
        "OnsipSubscriptionNotActive",
    ] {
        for target in ["OnsipAddressOffline", "OnsipDomainOutage"] {
            assert!(
                has(health, target, &["job", "instance"]),
                "{health} should mute {target}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// House rules for alerts and runbooks
// ---------------------------------------------------------------------------------------------

#[test]
fn alerts_have_severity_annotations_and_a_runbook() {
    let alerts = all_alerts();
    assert!(
        alerts.len() >= 12,
        "expected at least 12 alerts, got {}",
        alerts.len()
    );
    let mut problems = Vec::new();
    let mut runbooks_used = BTreeSet::new();
    for a in &alerts {
        let severity = a.labels.get("severity").map(String::as_str);
        if !matches!(severity, Some("warning") | Some("critical")) {
            problems.push(format!("{}: severity {severity:?}", a.name));
        }
        for key in ["summary", "description", "runbook_url"] {
            if a.annotations
                .get(key)
                .filter(|v| !v.trim().is_empty())
                .is_none()
            {
                problems.push(format!("{}: no {key}", a.name));
            }
        }
        let url = a
            .annotations
            .get("runbook_url")
            .cloned()
            .unwrap_or_default();
        let expected = format!("{RUNBOOK_BASE}{}.md", a.name);
        if url != expected {
            problems.push(format!(
                "{}: runbook_url {url:?}, expected {expected:?}",
                a.name
            ));
        }
        let runbook = repo_path(&format!("runbooks/{}.md", a.name));
        match std::fs::read_to_string(&runbook) {
            Ok(text) => {
                for section in ["## What it means", "## How to check", "## What to do"] {
                    if !text.contains(section) {
                        problems.push(format!("{}: no {section:?}", runbook.display()));
                    }
                }
            }
            Err(e) => problems.push(format!("{}: {e}", runbook.display())),
        }
        runbooks_used.insert(format!("{}.md", a.name));
        // An alert about an address names it.
        if a.expr.contains("onsip_user_agent_") {
            let desc = a
                .annotations
                .get("description")
                .cloned()
                .unwrap_or_default();
            if !desc.contains("{{ $labels.user }}@{{ $labels.domain }}") {
                problems.push(format!("{}: description does not name the address", a.name));
            }
        }
    }
    for file in files_with_suffix(&repo_path("runbooks"), ".md") {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        if name != "README.md" && !runbooks_used.contains(&name) {
            problems.push(format!("runbooks/{name}: no alert of that name"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn per_address_and_domain_alerts_are_gated_on_exporter_health() {
    for a in all_alerts() {
        let per_address =
            a.expr.contains("onsip_user_agent_") || a.expr.contains("onsip_domain_addresses");
        if per_address && a.name != "OnsipNoEvents" {
            assert!(
                a.expr.contains("onsip:exporter_settled"),
                "{} reads per-address/domain data without the exporter-health gate",
                a.name
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------------------------

#[test]
fn every_rule_expression_parses() {
    let exprs: Vec<(String, String)> = all_rule_files()
        .iter()
        .flat_map(|f| rule_exprs(f))
        .collect();
    assert!(exprs.len() >= 13, "{exprs:?}");
    if let Err(errors) = parse_all(&exprs) {
        panic!(
            "rule expressions that promql-parser rejects:\n{}",
            errors.join("\n")
        );
    }
}

#[test]
fn every_dashboard_query_parses_with_variables_substituted() {
    let mut queries = substituted_dashboard_queries("exporter:8080", "example.com", "alice");
    let vars = grafana_vars("exporter:8080", "example.com", "alice");
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    queries.extend(
        dashboard_queries(&repo_path("dashboards"))
            .into_iter()
            .map(|(t, e)| (t, substitute_grafana_vars(&e, &vars))),
    );
    if let Err(errors) = parse_all(&queries) {
        panic!(
            "dashboard queries that promql-parser rejects:\n{}",
            errors.join("\n")
        );
    }
    // Multi-value selections (Grafana renders them as an escaped regex group) parse too.
    let multi = [
        ("job", JOB),
        ("instance", "a:1"),
        ("instance", "b:2"),
        ("domain", "example.com"),
        ("domain", "example.org"),
        ("user", ".*"),
    ];
    let queries: Vec<(String, String)> = dashboard_queries(&repo_path("dashboards"))
        .into_iter()
        .map(|(t, e)| (t, substitute_grafana_vars(&e, &multi)))
        .collect();
    if let Err(errors) = parse_all(&queries) {
        panic!("with multi-value variables:\n{}", errors.join("\n"));
    }
}

#[test]
fn grafana_variable_substitution() {
    let vars = [
        ("domain", "example.com"),
        ("user", "alice"),
        ("job", "a"),
        ("job", "b.c"),
    ];
    assert_eq!(
        substitute_grafana_vars(
            r#"x{domain=~"$domain", user="${user}"}[$__rate_interval]"#,
            &vars
        ),
        r#"x{domain=~"example.com", user="alice"}[1m]"#
    );
    assert_eq!(
        substitute_grafana_vars(r#"{job=~"$job"}"#, &vars),
        r#"{job=~"(a|b\\.c)"}"#
    );
    assert_eq!(
        substitute_grafana_vars(r#"{job=~"${job:pipe}"}"#, &vars),
        r#"{job=~"a|b.c"}"#
    );
    assert_eq!(
        substitute_grafana_vars("[[domain]] ${domain:regex}", &vars),
        r#"example.com example\\.com"#
    );
    assert_eq!(
        substitute_grafana_vars("$unknown ${x} $", &vars),
        "$unknown ${x} $"
    );
    assert_eq!(
        substitute_grafana_vars("[$__range] $__interval", &[("__range", "6h")]),
        "[6h] 30s"
    );
}

// ---------------------------------------------------------------------------------------------
// Dashboards
// ---------------------------------------------------------------------------------------------

#[test]
fn dashboards_type_check_against_grafana_schema() {
    let script = repo_path("dashboards/check/run.sh");
    let out = run(Command::new("bash").arg(&script));
    assert!(out.contains("dashboard type-check passed"), "{out}");
}

#[test]
fn dashboards_use_the_datasource_variable_and_their_filters() {
    let mut uids = BTreeSet::new();
    let mut problems = Vec::new();
    for path in dashboard_files(&repo_path("dashboards")) {
        let d = read_dashboard(&path);
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let uid = d["uid"].as_str().unwrap_or_default().to_string();
        if uid.is_empty() || !uids.insert(uid.clone()) {
            problems.push(format!("{name}: missing or duplicate uid {uid:?}"));
        }
        let vars: BTreeMap<String, String> = d["templating"]["list"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|v| {
                (
                    v["name"].as_str().unwrap_or_default().to_string(),
                    v["type"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect();
        if vars.get("datasource").map(String::as_str) != Some("datasource") {
            problems.push(format!(
                "{name}: no `datasource` variable of type datasource"
            ));
        }
        let needed: &[&str] = if name.contains("exporter") {
            &["job", "instance"]
        } else {
            &["job", "domain", "user"]
        };
        for v in needed {
            if vars.get(*v).map(String::as_str) != Some("query") {
                problems.push(format!("{name}: no `{v}` query variable"));
            }
        }
        let mut ids = BTreeSet::new();
        for panel in dashboard_panels(&d) {
            let title = panel["title"].as_str().unwrap_or("?");
            let id = panel["id"].as_i64().unwrap_or(-1);
            if !ids.insert(id) {
                problems.push(format!("{name}: panel {title:?}: duplicate id {id}"));
            }
            let gp = &panel["gridPos"];
            let (x, w) = (
                gp["x"].as_i64().unwrap_or(-1),
                gp["w"].as_i64().unwrap_or(-1),
            );
            if x < 0 || w <= 0 || x + w > 24 {
                problems.push(format!("{name}: panel {title:?}: gridPos {gp}"));
            }
            if panel["type"] == "row" {
                continue;
            }
            if panel["datasource"]["uid"] != "${datasource}" {
                problems.push(format!(
                    "{name}: panel {title:?}: datasource not ${{datasource}}"
                ));
            }
            let targets = panel["targets"].as_array().cloned().unwrap_or_default();
            if targets.is_empty() {
                problems.push(format!("{name}: panel {title:?}: no query"));
            }
            for t in targets {
                if t["datasource"]["uid"] != "${datasource}" {
                    problems.push(format!(
                        "{name}: panel {title:?}: a target's datasource not ${{datasource}}"
                    ));
                }
                let expr = t["expr"].as_str().unwrap_or_default();
                for v in needed {
                    if *v == "instance" && !expr.contains("$instance") && expr.contains("onsip_") {
                        problems.push(format!(
                            "{name}: panel {title:?}: query ignores $instance: {expr}"
                        ));
                    }
                }
                if !expr.contains("$job") {
                    problems.push(format!(
                        "{name}: panel {title:?}: query ignores $job: {expr}"
                    ));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// Against a real Prometheus
// ---------------------------------------------------------------------------------------------

/// Serves a settable /metrics text on 127.0.0.1 (HTTP/1.0-style: one request per connection).
struct FixtureServer {
    addr: SocketAddr,
    body: Arc<Mutex<String>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl FixtureServer {
    fn start(body: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the fixture server");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let body = Arc::new(Mutex::new(body));
        let stop = Arc::new(AtomicBool::new(false));
        let (b, s) = (body.clone(), stop.clone());
        let thread = thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut conn, _)) => {
                        let _ = conn.set_nonblocking(false);
                        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                        let mut req = Vec::new();
                        let mut buf = [0u8; 2048];
                        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                            match conn.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => req.extend_from_slice(&buf[..n]),
                            }
                        }
                        let text = b.lock().unwrap().clone();
                        let _ = write!(
                            conn,
                            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n\
                             Content-Length: {}\r\nConnection: close\r\n\r\n{text}",
                            text.len()
                        );
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(20))
                    }
                    Err(_) => thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Self {
            addr,
            body,
            stop,
            thread: Some(thread),
        }
    }

    fn set(&self, body: String) {
        *self.body.lock().unwrap() = body;
    }
}

impl Drop for FixtureServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn wait_for(what: &str, deadline: Duration, mut ok: impl FnMut() -> Option<String>) {
    let start = Instant::now();
    let mut last;
    loop {
        match ok() {
            None => return,
            Some(why) => last = why,
        }
        if start.elapsed() > deadline {
            panic!("{what}: not after {deadline:?}: {last}");
        }
        thread::sleep(Duration::from_millis(250));
    }
}

/// The fixture with its "recent" timestamps (last event, process start) moved to now, as a
/// running exporter would show them.
fn fresh_fixture() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let text = std::fs::read_to_string(repo_path("tests/fixtures/onsip-metrics.prom")).unwrap();
    text.lines()
        .map(|line| {
            if line.starts_with("onsip_last_event_timestamp_seconds ") {
                format!("onsip_last_event_timestamp_seconds {}", now - 30)
            } else if line.starts_with("process_start_time_seconds ") {
                format!("process_start_time_seconds {}", now - 3600)
            } else {
                line.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

#[test]
fn queries_and_rules_work_against_prometheus_scraping_the_fixture() {
    let fixture = fresh_fixture();
    let server = FixtureServer::start(fixture.clone());
    let rules_dir = tempfile::tempdir().unwrap();
    let mut builder = Prometheus::builder()
        .scrape(JOB, server.addr, "/metrics")
        .scrape_interval(Duration::from_secs(1))
        .evaluation_interval(Duration::from_secs(1));
    for f in write_shortened_rules(rules_dir.path()) {
        builder = builder.rule_file(f);
    }
    let prom = builder.start();
    let url = prom.url().to_string();
    prom.wait_for_scrape(Duration::from_secs(60));
    // rate() and changes() need a few samples.
    wait_for(
        "five scrapes",
        Duration::from_secs(60),
        || match instant_query(&url, "count_over_time(onsip_up[1m])") {
            Ok(a) => {
                let n: f64 = a["data"]["result"][0]["value"][1]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0.0);
                (n < 5.0).then(|| format!("{n} scrapes"))
            }
            Err(e) => Some(e),
        },
    );

    // Every dashboard query returns data; every rule expression evaluates.
    let instance = server.addr.to_string();
    let problems = queries_and_rules_problems(&url, &instance, "example.com", "alice");
    assert!(
        problems.is_empty(),
        "against the fixture:\n{}",
        problems.join("\n")
    );

    // The rule evaluations themselves are healthy, and the gate is open.
    wait_for("rules evaluated", Duration::from_secs(30), || {
        let groups = prom.api().rules();
        let mut pending = Vec::new();
        for g in groups.as_array().into_iter().flatten() {
            for r in g["rules"].as_array().into_iter().flatten() {
                match r["health"].as_str() {
                    Some("ok") => {}
                    other => pending.push(format!("{}: {other:?} {}", r["name"], r["lastError"])),
                }
            }
        }
        (!pending.is_empty()).then(|| pending.join("; "))
    });
    assert_eq!(
        query_returns_data(&url, "onsip:exporter_settled == 1"),
        Ok(true),
        "the exporter-health gate is closed on a healthy fixture"
    );

    // bob's only phone goes away: OnsipAddressOffline goes pending (then fires) for bob only;
    // carol and fax have 0 devices but never had one as far as Prometheus knows: silent.
    server.set(fixture.replace(
        "onsip_user_agent_devices{domain=\"example.com\",user=\"bob\"} 1",
        "onsip_user_agent_devices{domain=\"example.com\",user=\"bob\"} 0",
    ));
    wait_for(
        "OnsipAddressOffline for bob",
        Duration::from_secs(30),
        || {
            let alerts = prom.api().alerts();
            let offline: Vec<String> = alerts
                .as_array()
                .into_iter()
                .flatten()
                .filter(|a| a["labels"]["alertname"] == "OnsipAddressOffline")
                .map(|a| {
                    format!(
                        "{}:{}",
                        a["labels"]["user"].as_str().unwrap_or("?"),
                        a["state"]
                    )
                })
                .collect();
            let bob = offline.iter().any(|a| a.starts_with("bob:"));
            let others = offline.iter().any(|a| !a.starts_with("bob:"));
            assert!(!others, "only bob may be offline: {offline:?}");
            (!bob).then(|| format!("alerts: {offline:?}"))
        },
    );
    // The health alerts stay quiet on a healthy exporter.
    let alerts = prom.api().alerts();
    for a in alerts.as_array().into_iter().flatten() {
        let name = a["labels"]["alertname"].as_str().unwrap_or_default();
        assert!(
            matches!(name, "OnsipAddressOffline"),
            "unexpected alert on the healthy fixture: {a}"
        );
    }
}
