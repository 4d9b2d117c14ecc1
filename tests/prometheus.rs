//! `INFO quota` in Prometheus, the way an operator would run it: Debian's
//! `prometheus-redis-exporter` (`scripts/deps.sh` installs it) with the shipped
//! `examples/prometheus/quota.lua` as its `--script`, on a loopback port, scraped over HTTP.
//!
//! What an operator would notice: every numeric `quota_*` field is a metric, with the value
//! `INFO quota` shows; the listener's state is one 0/1 metric per state; the Grafana dashboard
//! shipped beside the script asks only for metrics that are there.
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

const T: &str = "acme";
const P: &str = "chat";

fn exporter_binary() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin")])
        .map(|d| d.join("prometheus-redis-exporter"))
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!("prometheus-redis-exporter not found: run scripts/deps.sh (make deps)")
        })
}

fn example(name: &str) -> PathBuf {
    repo_root().join("examples").join("prometheus").join(name)
}

/// The exporter on a free loopback port; killed on drop.
struct Exporter {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Exporter {
    fn start(redis: &RedisServer) -> Exporter {
        let port = free_port();
        let log = unique_dir("exporter").join("exporter.log");
        let out = std::fs::File::create(&log).expect("exporter log");
        let err = out.try_clone().expect("exporter log");
        let child = Command::new(exporter_binary())
            .arg("--redis.addr")
            .arg(format!("redis://127.0.0.1:{}", redis.port()))
            .arg("--web.listen-address")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--script")
            .arg(example("quota.lua"))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("start prometheus-redis-exporter");
        let exporter = Exporter { child, port, log };
        assert!(
            wait_until(Duration::from_secs(10), || exporter.get("/metrics").is_ok()),
            "the exporter did not answer on 127.0.0.1:{port}: {}",
            std::fs::read_to_string(&exporter.log).unwrap_or_default()
        );
        exporter
    }

    /// One HTTP/1.0 GET on the exporter: the body.
    fn get(&self, path: &str) -> Result<String, String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").map_err(|e| e.to_string())?;
        let mut text = String::new();
        s.read_to_string(&mut text).map_err(|e| e.to_string())?;
        let (head, body) = text.split_once("\r\n\r\n").ok_or("no HTTP header")?;
        if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
            return Err(head.to_owned());
        }
        Ok(body.to_owned())
    }

    /// A scrape: every sample as `metric{labels}` -> value.
    fn scrape(&self) -> BTreeMap<String, f64> {
        let body = self
            .get("/metrics")
            .unwrap_or_else(|e| panic!("scrape: {e}"));
        body.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                Some((name.to_owned(), value.parse().ok()?))
            })
            .collect()
    }

    /// The `quota_*` fields the script gave, by name.
    fn quota(&self) -> BTreeMap<String, f64> {
        self.scrape()
            .into_iter()
            .filter_map(|(name, v)| {
                let key = name
                    .strip_prefix("redis_script_values{key=\"")?
                    .strip_suffix("\"}")?;
                Some((key.to_owned(), v))
            })
            .collect()
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn every_info_quota_field_reaches_prometheus_through_the_exporter_script() {
    let env = TestEnv::start(&[("flush-interval", "1"), ("cache-ttl-ms", "600000")]);
    let server = &env.server;
    server.wait_notify_state("listening", Duration::from_secs(15));
    let mut con = env.con();
    // One account flushed, then no round for an hour: the ledger's pending accounts stay as
    // the admissions below leave them, and nothing else moves by itself.
    let warmup = con.admit([T, P, "warmup", "gpt"], "REQUESTS_PER_DAY 3");
    assert!(warmup.allowed);
    let flushed = || {
        info_i64(server, "quota_ledger_flushes") >= 1
            && info_i64(server, "quota_ledger_accounts_pending") == 0
    };
    assert!(
        wait_until(Duration::from_secs(20), flushed),
        "the first rounds did not flush"
    );
    query(&mut con, &["CONFIG", "SET", "quota.flush-interval", "3600"]).expect("CONFIG SET");
    con.grant([T, P, "alice", "*"], "REQUESTS_PER_DAY 10");
    for user in ["alice", "bob", "carol"] {
        for _ in 0..3 {
            assert!(con.admit([T, P, user, "gpt"], "REQUESTS_PER_DAY 3").allowed);
        }
    }
    assert!(
        !con.admit([T, P, "bob", "gpt"], "REQUESTS_PER_DAY 3")
            .allowed
    );
    let exporter = Exporter::start(server);

    let info = server.info("quota");
    let scraped = exporter.quota();
    let numeric: BTreeSet<&String> = info
        .iter()
        .filter(|(k, v)| k.starts_with("quota_") && v.parse::<f64>().is_ok())
        .map(|(k, _)| k)
        .collect();
    assert!(numeric.len() > 40, "{info:?}");
    for name in &numeric {
        assert!(
            scraped.contains_key(*name),
            "{name} is not exported: {scraped:?}"
        );
    }
    // Nothing but INFO's fields, and the listener's state one-hot.
    for name in scraped.keys() {
        assert!(
            numeric.contains(name) || name.starts_with("quota_notify_state_"),
            "{name} is not an INFO quota field"
        );
    }
    let states: BTreeMap<&str, f64> = ["off", "connecting", "listening", "disconnected"]
        .iter()
        .map(|s| (*s, scraped[&format!("quota_notify_state_{s}")]))
        .collect();
    assert_eq!(
        states,
        BTreeMap::from([
            ("off", 0.0),
            ("connecting", 0.0),
            ("listening", 1.0),
            ("disconnected", 0.0)
        ])
    );
    // The values are INFO's: what these admissions did, and what does not move by itself.
    for (name, want) in [
        ("quota_admits_allowed", 10.0),
        ("quota_admits_denied", 1.0),
        ("quota_grants", 1.0),
        ("quota_ledger_accounts_pending", 3.0),
        ("quota_cache_entries", 4.0),
        ("quota_pg_down", 0.0),
        ("quota_queue_depth", 0.0),
    ] {
        assert_eq!(scraped[name], want, "{name}");
    }
    for name in [
        "quota_cache_entries",
        "quota_cache_misses",
        "quota_queue_max",
        "quota_pool_size",
        "quota_cache_max_entries",
        "quota_ledger_accounts_pending",
    ] {
        let info_value: f64 = info[name].parse().expect(name);
        assert_eq!(scraped[name], info_value, "{name}");
    }
    let up = exporter.scrape();
    assert_eq!(up.get("redis_up"), Some(&1.0));

    // The next scrape follows: one more admission is counted.
    assert!(
        con.admit([T, P, "dave", "gpt"], "REQUESTS_PER_DAY 3")
            .allowed
    );
    let after = exporter.quota();
    assert_eq!(after["quota_admits_allowed"], 11.0);
    assert_eq!(after["quota_ledger_accounts_pending"], 4.0);

    // The dashboard shipped beside the script asks only for what the exporter gives.
    let dashboard = std::fs::read_to_string(example("grafana-dashboard.json")).expect("dashboard");
    let json: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard JSON");
    let mut exprs = Vec::new();
    collect_exprs(&json, &mut exprs);
    assert!(exprs.len() >= 8, "{exprs:?}");
    for expr in &exprs {
        let mut rest = expr.as_str();
        let mut named = 0;
        while let Some(at) = rest.find("key=\"") {
            let tail = &rest[at + 5..];
            let end = tail.find('"').expect("closing quote");
            let key = &tail[..end];
            assert!(
                scraped.contains_key(key),
                "the dashboard asks for {key}, which the exporter does not give: {expr}"
            );
            named += 1;
            rest = &tail[end..];
        }
        assert!(named > 0, "a panel names no quota field: {expr}");
        assert!(expr.contains("redis_script_values"), "{expr}");
    }
}

/// Every `"expr"` string under `v`.
fn collect_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}
