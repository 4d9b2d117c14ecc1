//! Smoke test: the module loads into the redis-server under test, on the shared
//! PostgreSQL, registers its commands and exposes its configuration.
mod common;

use common::*;

#[test]
fn module_loads_with_commands_and_config() {
    let (schema, server, mut con) = test_server_con();

    // MODULE LIST contains a module named "quota".
    let modules = to_array(query(&mut con, &["MODULE", "LIST"]).expect("MODULE LIST"));
    let names: Vec<String> = modules
        .into_iter()
        .filter_map(|m| try_to_map(m).and_then(|m| field_str(&m, "name")))
        .collect();
    assert!(
        names.iter().any(|n| n == "quota"),
        "MODULE LIST has no module named quota: {names:?}"
    );

    // COMMAND INFO quota.get describes the command.
    let info = to_array(query(&mut con, &["COMMAND", "INFO", "quota.get"]).expect("COMMAND INFO"));
    assert!(
        !info.is_empty() && info[0] != Value::Nil,
        "COMMAND INFO quota.get is empty: {info:?}"
    );

    // CONFIG GET quota.schema returns the schema given at load time.
    let cfg = to_map(query(&mut con, &["CONFIG", "GET", "quota.schema"]).expect("CONFIG GET"));
    assert_eq!(
        cfg.get("quota.schema").and_then(value_to_string).as_deref(),
        Some(schema.as_str()),
        "CONFIG GET quota.schema: {cfg:?}"
    );

    // Same through RESP3.
    let mut con3 = server.client_resp3();
    let cfg3 = to_map(query(&mut con3, &["CONFIG", "GET", "quota.schema"]).expect("CONFIG GET"));
    assert_eq!(
        cfg3.get("quota.schema")
            .and_then(value_to_string)
            .as_deref(),
        Some(schema.as_str())
    );

    assert!(
        server.version() >= (7, 0, 0),
        "version {:?}",
        server.version()
    );
}

// ---------------------------------------------------------------------------
// The harness itself (plain redis-server, no module), so that a broken harness
// shows up here rather than as odd failures elsewhere.
// ---------------------------------------------------------------------------

#[test]
fn harness_redis_restart_keeps_aof_and_kill9_restarts() {
    let mut r = RedisServer::builder()
        .without_module()
        .conf("appendonly yes")
        .conf("appendfsync always")
        .start();
    let mut c = r.client();
    let _: () = redis::cmd("SET").arg("k").arg("v").query(&mut c).unwrap();
    r.restart();
    let mut c = r.client();
    let got: Option<String> = redis::cmd("GET").arg("k").query(&mut c).unwrap();
    assert_eq!(got.as_deref(), Some("v"));
    r.kill9();
    assert!(!r.is_alive());
    r.restart();
    let mut c = r.client();
    let got: Option<String> = redis::cmd("GET").arg("k").query(&mut c).unwrap();
    assert_eq!(
        got.as_deref(),
        Some("v"),
        "AOF with appendfsync always survives SIGKILL"
    );
    let hello = to_map(query(&mut r.client_resp3(), &["HELLO", "3"]).unwrap());
    assert_eq!(field_i64(&hello, "proto"), 3);
    assert!(r.log().contains("Ready to accept connections"));
    r.shutdown();
    assert!(!r.is_alive());
}

#[test]
fn harness_private_pg_stop_start_pause() {
    let pg = PgServer::start_private();
    let url = pg.url();
    pg.psql("CREATE TABLE t (x int); INSERT INTO t VALUES (42)");
    pg.stop();
    assert!(!pg.is_running());
    assert!(pg.try_psql("SELECT 1").is_err());
    pg.start();
    assert_eq!(pg.url(), url, "same port after start");
    assert_eq!(pg.psql("SELECT x FROM t"), "42");

    assert!(
        pg.pids().len() >= 2,
        "postmaster and children: {:?}",
        pg.pids()
    );
    pg.pause();
    // Paused: a connection is accepted by the kernel but nothing answers.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (u, d) = (url.clone(), done.clone());
    let t = std::thread::spawn(move || {
        let r = try_psql(&u, "SELECT 1");
        d.store(true, std::sync::atomic::Ordering::SeqCst);
        r
    });
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert!(
        !done.load(std::sync::atomic::Ordering::SeqCst),
        "psql answered while paused"
    );
    pg.resume();
    assert_eq!(t.join().unwrap().as_deref(), Ok("1"));
    let dir = pg.dir().to_path_buf();
    drop(pg);
    assert!(!dir.exists(), "dropped PgServer removes its directory");
}

#[test]
fn harness_replica_syncs() {
    let master = RedisServer::builder().without_module().start();
    let replica = RedisServer::builder()
        .without_module()
        .replica_of(&master)
        .start();
    let _: () = redis::cmd("SET")
        .arg("x")
        .arg("y")
        .query(&mut master.client())
        .unwrap();
    replica.wait_replica_synced(&master, std::time::Duration::from_secs(30));
    let got: Option<String> = redis::cmd("GET")
        .arg("x")
        .query(&mut replica.client())
        .unwrap();
    assert_eq!(got.as_deref(), Some("y"));
}

#[test]
fn harness_cluster_of_three() {
    let cluster = RedisCluster::start(3, RedisServer::builder().without_module());
    let mut cc = cluster.cluster_client();
    for i in 0..200 {
        let _: () = redis::cmd("SET")
            .arg(format!("user:{i}"))
            .arg(i)
            .query(&mut cc)
            .unwrap();
    }
    for n in &cluster.nodes {
        let keys: i64 = redis::cmd("DBSIZE").query(&mut n.client()).unwrap();
        assert!(keys > 20, "keys spread over every node: {keys}");
    }
    let got: i64 = redis::cmd("GET")
        .arg("user:7")
        .query(&mut cluster.node_for_key("user:7").client())
        .unwrap();
    assert_eq!(got, 7);
}
