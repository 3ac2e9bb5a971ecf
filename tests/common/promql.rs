//! PromQL from the repository's dashboards and alert rules, for the tests that check them.
//!
//! Pure helpers (no server): [`dashboard_queries`] collects every query of every dashboard
//! (panel targets, panels nested in rows, templating variables), [`substitute_grafana_vars`]
//! replaces Grafana's variables the way Grafana's Prometheus data source would,
//! [`alert_rules`]/[`alert_exprs`]/[`rule_exprs`] read rule files, [`parse_all`] parses with
//! the `promql-parser` crate, and [`rewrite_rule_durations`] shortens the tunable durations of
//! the rule file for a test that cannot wait ten minutes.
//!
//! Against a real Prometheus: [`query_returns_data`] runs an instant query and says whether
//! it returned any series (an error from Prometheus is an `Err`).
//!
//! ```ignore
//! let queries = dashboard_queries(&repo_path("dashboards"));
//! let vars = [("job", "onsip-ua-exporter"), ("domain", "example.com"), ("user", "alice")];
//! for (title, expr) in &queries {
//!     let expr = substitute_grafana_vars(expr, &vars);
//!     assert!(query_returns_data(prom.url(), &expr).unwrap(), "{title}: no data for {expr}");
//! }
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

/// A path inside the repository (tests run with the package root as `CARGO_MANIFEST_DIR`).
pub fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// Files in `dir` whose name ends with `suffix`, sorted. Panics if `dir` cannot be read.
pub fn files_with_suffix(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.ends_with(suffix))
        })
        .collect();
    files.sort();
    files
}

/// The dashboards: `dir/*.json`, sorted.
pub fn dashboard_files(dir: &Path) -> Vec<PathBuf> {
    files_with_suffix(dir, ".json")
}

/// The rule files: `dir/*.rules.yml`, sorted.
pub fn rule_files(dir: &Path) -> Vec<PathBuf> {
    files_with_suffix(dir, ".rules.yml")
}

/// Reads and parses one dashboard. Panics with the file name on an error.
pub fn read_dashboard(path: &Path) -> Value {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()))
}

/// Every panel of a dashboard, rows' nested panels included, in order.
pub fn dashboard_panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        out.push(panel);
        for inner in panel["panels"].as_array().into_iter().flatten() {
            out.push(inner);
        }
    }
    out
}

/// Every PromQL query of every dashboard in `dir`, as (`"<dashboard> / <panel> [refId]"` or
/// `"<dashboard> / variable <name>"`, expression), with the Grafana variables still in.
///
/// Panel targets (also in rows), hidden ones excepted; query variables: `label_values(sel,
/// label)` becomes `sel` (it returns data exactly when the variable would have values),
/// `label_values(label)` becomes `count by (label) ({label!=""})`, `query_result(q)` becomes
/// `q`, `metrics(re)` becomes `{__name__=~"re"}`; `label_names()` and non-query variables
/// (datasource, custom, interval...) are skipped.
pub fn dashboard_queries(dir: &Path) -> Vec<(String, String)> {
    dashboard_files(dir)
        .iter()
        .flat_map(|path| dashboard_file_queries(path))
        .collect()
}

/// The queries of one dashboard file (see [`dashboard_queries`]).
pub fn dashboard_file_queries(path: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    {
        let dashboard = read_dashboard(path);
        let name = dashboard["title"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| path.file_name().unwrap().to_string_lossy().into_owned());
        for panel in dashboard_panels(&dashboard) {
            let title = panel["title"].as_str().unwrap_or("(untitled)");
            for target in panel["targets"].as_array().into_iter().flatten() {
                if target["hide"].as_bool() == Some(true) {
                    continue;
                }
                let Some(expr) = target["expr"].as_str() else {
                    continue;
                };
                let ref_id = target["refId"].as_str().unwrap_or("?");
                out.push((format!("{name} / {title} [{ref_id}]"), expr.to_string()));
            }
        }
        for var in dashboard["templating"]["list"]
            .as_array()
            .into_iter()
            .flatten()
        {
            if var["type"].as_str() != Some("query") {
                continue;
            }
            let query = match &var["query"] {
                Value::String(s) => s.as_str(),
                Value::Object(o) => o.get("query").and_then(Value::as_str).unwrap_or(""),
                _ => "",
            };
            let var_name = var["name"].as_str().unwrap_or("?");
            if let Some(expr) = variable_query_expr(query) {
                out.push((format!("{name} / variable {var_name}"), expr));
            }
        }
    }
    out
}

/// Like [`dashboard_queries`], with the variables substituted as each dashboard shows them
/// when opened: a variable that offers "All" (`includeAll`) gets its `allValue` (`.*` when it
/// has none: Grafana would list every value), every other variable the caller's value from
/// `vars` (plus [`BUILTIN_VARS`]). So the fleet overview is checked for all domains and users,
/// the address dashboard for the address in `vars`.
pub fn dashboard_queries_as_opened(dir: &Path, vars: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for path in dashboard_files(dir) {
        let dashboard = read_dashboard(&path);
        let mut all: Vec<(String, String)> = Vec::new();
        for var in dashboard["templating"]["list"]
            .as_array()
            .into_iter()
            .flatten()
        {
            if var["includeAll"].as_bool() == Some(true) {
                let value = var["allValue"].as_str().unwrap_or(".*").to_string();
                all.push((var["name"].as_str().unwrap_or("").to_string(), value));
            }
        }
        let mut merged: Vec<(&str, &str)> =
            all.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        merged.extend(
            vars.iter()
                .filter(|(n, _)| !all.iter().any(|(a, _)| a == n)),
        );
        for (title, expr) in dashboard_file_queries(&path) {
            out.push((title, substitute_grafana_vars(&expr, &merged)));
        }
    }
    out
}

/// The PromQL behind a Grafana Prometheus variable query (see [`dashboard_queries`]).
pub fn variable_query_expr(query: &str) -> Option<String> {
    let q = query.trim();
    let inner = |prefix: &str| -> Option<&str> {
        q.strip_prefix(prefix)
            .map(str::trim_start)
            .and_then(|r| r.strip_prefix('('))
            .and_then(|r| r.strip_suffix(')'))
            .map(str::trim)
    };
    if let Some(args) = inner("label_values") {
        // label_values(selector, label) or label_values(label): the label is after the last
        // top-level comma.
        return Some(match split_last_top_level_comma(args) {
            Some((selector, _label)) => selector.trim().to_string(),
            None => format!("count by ({args}) ({{{args}!=\"\"}})"),
        });
    }
    if let Some(args) = inner("query_result") {
        return Some(args.to_string());
    }
    if let Some(args) = inner("metrics") {
        return Some(format!("{{__name__=~\"{args}\"}}"));
    }
    if q.is_empty() || inner("label_names").is_some() {
        return None;
    }
    Some(q.to_string())
}

fn split_last_top_level_comma(s: &str) -> Option<(&str, &str)> {
    let (mut depth, mut in_str, mut escaped) = (0i32, None::<char>, false);
    let mut last = None;
    for (i, c) in s.char_indices() {
        if let Some(quote) = in_str {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == quote {
                in_str = None;
            }
            continue;
        }
        match c {
            '"' | '\'' | '`' => in_str = Some(c),
            '(' | '{' | '[' => depth += 1,
            ')' | '}' | ']' => depth -= 1,
            ',' if depth == 0 => last = Some(i),
            _ => {}
        }
    }
    last.map(|i| (&s[..i], &s[i + 1..]))
}

/// Grafana's built-in variables with the values [`substitute_grafana_vars`] uses unless the
/// caller passes its own.
pub const BUILTIN_VARS: &[(&str, &str)] = &[
    ("__rate_interval", "1m"),
    ("__interval", "30s"),
    ("__interval_ms", "30000"),
    ("__range", "1h"),
    ("__range_s", "3600"),
    ("__range_ms", "3600000"),
    ("datasource", "prometheus"),
];

/// Replaces Grafana variables in `expr`: `$name`, `${name}`, `${name:format}`, `[[name]]`,
/// `[[name:format]]`, with the values in `vars` (a name given several times is a multi-value
/// selection) and else [`BUILTIN_VARS`]. Unknown variables are left as they are, so a query
/// still holding one fails to parse.
///
/// Formatting follows Grafana's Prometheus data source: one value is put in as it is; several
/// become `(a|b)` with each value regex-escaped for use inside a PromQL string (`a.b` becomes
/// `a\\.b`). Formats: `regex` (always escaped, `(a|b)` when several), `pipe` (`a|b`), `csv`
/// and `raw` (`a,b`). For "All" with an `allValue` of `.*`, pass `(name, ".*")`.
pub fn substitute_grafana_vars(expr: &str, vars: &[(&str, &str)]) -> String {
    let mut values: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (name, value) in vars {
        values.entry(name).or_default().push(value);
    }
    for (name, value) in BUILTIN_VARS {
        values.entry(name).or_insert_with(|| vec![value]);
    }
    let render = |name: &str, format: Option<&str>| -> Option<String> {
        let vals = values.get(name)?;
        Some(match format {
            Some("regex") => {
                let escaped: Vec<String> = vals.iter().map(|v| grafana_regex_escape(v)).collect();
                if escaped.len() == 1 {
                    escaped[0].clone()
                } else {
                    format!("({})", escaped.join("|"))
                }
            }
            Some("pipe") => vals.join("|"),
            Some("csv") | Some("raw") => vals.join(","),
            _ if vals.len() == 1 => vals[0].to_string(),
            _ => {
                let escaped: Vec<String> = vals.iter().map(|v| grafana_regex_escape(v)).collect();
                format!("({})", escaped.join("|"))
            }
        })
    };
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut out = String::with_capacity(expr.len());
    let mut rest = expr;
    while let Some(pos) = rest.find(['$', '[']) {
        out.push_str(&rest[..pos]);
        let tail = &rest[pos..];
        let mut replaced = None;
        if let Some(after) = tail.strip_prefix("${") {
            if let Some(end) = after.find('}') {
                let (name, format) = split_format(&after[..end]);
                replaced = render(name, format).map(|v| (v, 2 + end + 1));
            }
        } else if let Some(after) = tail.strip_prefix("[[") {
            if let Some(end) = after.find("]]") {
                let (name, format) = split_format(&after[..end]);
                if name.chars().all(is_ident) && !name.is_empty() {
                    replaced = render(name, format).map(|v| (v, 2 + end + 2));
                }
            }
        } else if let Some(after) = tail.strip_prefix('$') {
            let len = after.find(|c: char| !is_ident(c)).unwrap_or(after.len());
            if len > 0 {
                replaced = render(&after[..len], None).map(|v| (v, 1 + len));
            }
        }
        match replaced {
            Some((value, consumed)) => {
                out.push_str(&value);
                rest = &tail[consumed..];
            }
            None => {
                out.push_str(&tail[..1]);
                rest = &tail[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

fn split_format(inner: &str) -> (&str, Option<&str>) {
    match inner.split_once(':') {
        Some((name, format)) => (name, Some(format)),
        None => (inner, None),
    }
}

/// Escapes a value as Grafana's Prometheus data source does for a multi-value variable used in
/// a regex matcher: regex metacharacters get a backslash, written doubled because the value
/// lands inside a PromQL string literal.
pub fn grafana_regex_escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\\\\\"),
            '$' | '^' | '*' | '{' | '}' | '[' | ']' | '\'' | '+' | '?' | '.' | '(' | ')' | '|' => {
                out.push_str("\\\\");
                out.push(c);
            }
            _ => out.push(c),
        }
    }
    out
}

/// One alerting rule of a rule file.
#[derive(Clone, Debug, Default)]
pub struct AlertRule {
    /// The rule group's name.
    pub group: String,
    /// `alert:`.
    pub name: String,
    /// `expr:`.
    pub expr: String,
    /// `for:` as written (`None` when absent).
    pub for_: Option<String>,
    /// `labels:`.
    pub labels: BTreeMap<String, String>,
    /// `annotations:`.
    pub annotations: BTreeMap<String, String>,
}

fn read_rule_groups(rule_file: &Path) -> Vec<serde_yaml::Value> {
    let text = std::fs::read_to_string(rule_file)
        .unwrap_or_else(|e| panic!("read {}: {e}", rule_file.display()));
    let doc: serde_yaml::Value = serde_yaml::from_str(&text)
        .unwrap_or_else(|e| panic!("{}: not YAML: {e}", rule_file.display()));
    doc.get("groups")
        .and_then(|g| g.as_sequence())
        .cloned()
        .unwrap_or_else(|| panic!("{}: no `groups:` list", rule_file.display()))
}

fn string_map(v: Option<&serde_yaml::Value>) -> BTreeMap<String, String> {
    v.and_then(|m| m.as_mapping())
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| {
                    let value = match v {
                        serde_yaml::Value::String(s) => s.clone(),
                        other => serde_yaml::to_string(other).ok()?.trim().to_string(),
                    };
                    Some((k.as_str()?.to_string(), value))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The alerting rules of a rule file, in order.
pub fn alert_rules(rule_file: &Path) -> Vec<AlertRule> {
    let mut out = Vec::new();
    for group in read_rule_groups(rule_file) {
        let group_name = group["name"].as_str().unwrap_or("").to_string();
        for rule in group
            .get("rules")
            .and_then(|r| r.as_sequence())
            .into_iter()
            .flatten()
        {
            let Some(name) = rule.get("alert").and_then(|a| a.as_str()) else {
                continue;
            };
            out.push(AlertRule {
                group: group_name.clone(),
                name: name.to_string(),
                expr: rule["expr"].as_str().unwrap_or("").to_string(),
                for_: rule.get("for").and_then(|f| f.as_str()).map(str::to_string),
                labels: string_map(rule.get("labels")),
                annotations: string_map(rule.get("annotations")),
            });
        }
    }
    out
}

/// (alert name, expression) of every alerting rule of a rule file.
pub fn alert_exprs(rule_file: &Path) -> Vec<(String, String)> {
    alert_rules(rule_file)
        .into_iter()
        .map(|r| (r.name, r.expr))
        .collect()
}

/// (alert or recorded name, expression) of every rule, alerting and recording.
pub fn rule_exprs(rule_file: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for group in read_rule_groups(rule_file) {
        for rule in group
            .get("rules")
            .and_then(|r| r.as_sequence())
            .into_iter()
            .flatten()
        {
            let name = rule
                .get("alert")
                .or_else(|| rule.get("record"))
                .and_then(|n| n.as_str())
                .unwrap_or("?");
            let expr = match &rule["expr"] {
                serde_yaml::Value::String(s) => s.clone(),
                other => serde_yaml::to_string(other).unwrap_or_default(),
            };
            out.push((name.to_string(), expr));
        }
    }
    out
}

/// Parses every expression with `promql-parser`; the errors name the item and quote it.
pub fn parse_all(items: &[(String, String)]) -> Result<(), Vec<String>> {
    let errors: Vec<String> = items
        .iter()
        .filter_map(|(name, expr)| {
            promql_parser::parser::parse(expr)
                .err()
                .map(|e| format!("{name}: {e}\n    {expr}"))
        })
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// Rewrites durations in a rule file's text: each `(from, to)` replaces every `[from]` range
/// and every `for: from` (e.g. `("10m", "3s")`), so a test can run the real rules with the
/// settle time W and the offline time M of alerts/onsip-ua-exporter.rules.yml shortened. Other
/// text is left alone.
pub fn rewrite_rule_durations(rules_yaml: &str, replacements: &[(&str, &str)]) -> String {
    let mut out = rules_yaml.to_string();
    for (from, to) in replacements {
        out = out.replace(&format!("[{from}]"), &format!("[{to}]"));
        out = out.replace(&format!("for: {from}\n"), &format!("for: {to}\n"));
    }
    out
}

/// Runs `expr` as an instant query against the Prometheus at `prom_url` (`http://host:port`)
/// and says whether it returned data: a non-empty vector or matrix, or any scalar or string.
/// `Err` when Prometheus answers with an error (bad query, evaluation failure) or cannot be
/// reached.
pub fn query_returns_data(prom_url: &str, expr: &str) -> Result<bool, String> {
    let answer = instant_query(prom_url, expr)?;
    let data = &answer["data"];
    match data["resultType"].as_str() {
        Some("vector") | Some("matrix") => Ok(data["result"]
            .as_array()
            .is_some_and(|series| !series.is_empty())),
        Some("scalar") | Some("string") => Ok(true),
        other => Err(format!(
            "query {expr:?}: unexpected result type {other:?}: {data}"
        )),
    }
}

/// The whole JSON answer of a successful instant query; `Err` with Prometheus's error
/// otherwise.
pub fn instant_query(prom_url: &str, expr: &str) -> Result<Value, String> {
    let url = format!("{}/api/v1/query", prom_url.trim_end_matches('/'));
    let response = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(30))
        .build()
        .post(&url)
        .send_form(&[("query", expr)]);
    let response = match response {
        Ok(r) => r,
        // Prometheus explains a 4xx/5xx in a JSON body.
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => return Err(format!("query {expr:?}: {e}")),
    };
    let body = response
        .into_string()
        .map_err(|e| format!("query {expr:?}: read body: {e}"))?;
    let answer: Value = serde_json::from_str(&body)
        .map_err(|e| format!("query {expr:?}: not JSON ({e}): {body}"))?;
    if answer["status"] != "success" {
        return Err(format!(
            "query {expr:?}: {}: {}",
            answer["errorType"].as_str().unwrap_or("error"),
            answer["error"].as_str().unwrap_or(&body)
        ));
    }
    Ok(answer)
}

// ---------------------------------------------------------------------------------------------
// Shared by the fixture test and the live test
// ---------------------------------------------------------------------------------------------

/// The scrape job name the rules and dashboards expect.
pub const JOB: &str = "onsip-ua-exporter";

/// Every `alerts/*.rules.yml`.
pub fn all_rule_files() -> Vec<PathBuf> {
    let files = rule_files(&repo_path("alerts"));
    assert!(!files.is_empty(), "no alerts/*.rules.yml");
    files
}

/// Values for the dashboards' variables, as a user would pick them.
pub fn grafana_vars(instance: &str, domain: &str, user: &str) -> Vec<(&'static str, String)> {
    vec![
        ("datasource", "prometheus".to_string()),
        ("job", JOB.to_string()),
        ("instance", instance.to_string()),
        ("domain", domain.to_string()),
        ("user", user.to_string()),
    ]
}

/// Every dashboard query as the dashboard shows it when opened ("All" where offered), with
/// `grafana_vars` for the single-select variables.
pub fn substituted_dashboard_queries(
    instance: &str,
    domain: &str,
    user: &str,
) -> Vec<(String, String)> {
    let vars = grafana_vars(instance, domain, user);
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let queries = dashboard_queries_as_opened(&repo_path("dashboards"), &vars);
    assert!(queries.len() > 20, "too few dashboard queries: {queries:?}");
    queries
}

/// Copies the rule files into `dir` with the settle time W (10m) shortened to 3s and the
/// offline/outage `for`s (10m, 5m) to 2s, so a test sees alerts go pending in seconds.
pub fn write_shortened_rules(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for file in all_rule_files() {
        let text = std::fs::read_to_string(&file).expect("read rule file");
        let text = rewrite_rule_durations(&text, &[("10m", "3s"), ("5m", "2s")]);
        let dst = dir.join(file.file_name().expect("file name"));
        std::fs::write(&dst, text).expect("write rule file");
        out.push(dst);
    }
    out
}

/// Runs every dashboard query (variables substituted for `domain`/`user`) and every rule
/// expression against the Prometheus at `url`; returns one line per query with no data and
/// per expression that fails to evaluate.
pub fn queries_and_rules_problems(
    url: &str,
    instance: &str,
    domain: &str,
    user: &str,
) -> Vec<String> {
    let mut problems = Vec::new();
    for (title, expr) in substituted_dashboard_queries(instance, domain, user) {
        match query_returns_data(url, &expr) {
            Ok(true) => {}
            Ok(false) => problems.push(format!("{title}: no data\n    {expr}")),
            Err(e) => problems.push(format!("{title}: {e}")),
        }
    }
    for file in all_rule_files() {
        for (name, expr) in rule_exprs(&file) {
            if let Err(e) = query_returns_data(url, &expr) {
                problems.push(format!("rule {name}: {e}"));
            }
        }
    }
    problems
}
