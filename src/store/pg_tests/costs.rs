//! What the store's reads cost against a real PostgreSQL: the pooler-safe timeouts measured by
//! hand, and the plans of the project-wide reads (`QUOTA.FIND`, `QUOTA.TOP`), which must read
//! their own indexes.

use std::time::Instant;

use postgres::types::Type;

use super::*;

/// What the pooler-safe timeouts cost (run by hand: `cargo test --release --lib
/// measure_timeout_costs -- --ignored --nocapture`): a cache load of one user bare on a
/// connection, against the same load through `Store::load_user` (checkout, a read-only
/// transaction opened with the timeouts, the read, COMMIT); and the statement that opens every
/// transaction, against a whole grant. Rounds alternate, so the load of a shared machine falls
/// on both sides; medians of 7.
#[test]
#[ignore]
fn measure_timeout_costs() {
    let fx = fixture!("costs");
    let mut client = fx.client();
    let micros =
        |started: Instant, n: u32| started.elapsed().as_nanos() as f64 / f64::from(n) / 1000.0;
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };

    let sql = queries::Statements::new(&fx.schema);
    let setup = tx_setup(2000);
    let (mut bare, mut bounded, mut empty, mut opened, mut grants) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..7 {
        let started = Instant::now();
        for _ in 0..500 {
            queries::active_rows(&mut client, &sql, &USER).expect("read");
        }
        bare.push(micros(started, 500));
        let started = Instant::now();
        for _ in 0..500 {
            fx.store.load_user(&USER).expect("read");
        }
        bounded.push(micros(started, 500));
        let started = Instant::now();
        for _ in 0..300 {
            client
                .transaction()
                .expect("begin")
                .commit()
                .expect("commit");
        }
        empty.push(micros(started, 300));
        let started = Instant::now();
        for _ in 0..300 {
            let mut tx = client.transaction().expect("begin");
            tx.batch_execute(&setup).expect("setup");
            tx.commit().expect("commit");
        }
        opened.push(micros(started, 300));
        let started = Instant::now();
        for i in 0..100 {
            let user = UserId {
                user: &format!("w{round}_{i}"),
                ..USER
            };
            fx.store
                .grant(&user, "b", &req(&[(RequestsPerDay, 5)]), now_ms())
                .expect("grant");
        }
        grants.push(micros(started, 100));
    }
    println!(
        "a cache load of one user: {:.1} µs bare, {:.1} µs through the store (bounded)",
        median(bare),
        median(bounded)
    );
    println!(
        "BEGIN + COMMIT {:.1} µs, with the setup statement {:.1} µs; a whole grant {:.1} µs",
        median(empty),
        median(opened),
        median(grants)
    );
}

/// A statement parameter and its type.
type Param<'a> = (&'a (dyn postgres::types::ToSql + Sync), Type);

/// The plan of `sql` with `params` (`EXPLAIN`, bound like the module binds them).
fn plan_of(fx: &Fixture, sql: &str, params: &[Param<'_>]) -> String {
    let rows = fx
        .client()
        .query_typed(&format!("EXPLAIN {sql}"), params)
        .unwrap_or_else(|e| panic!("EXPLAIN {sql}: {e}"));
    rows.iter()
        .map(|r| r.get::<_, String>(0))
        .collect::<Vec<_>>()
        .join("\n")
}

/// QUOTA.FIND and QUOTA.TOP read their own indexes (which a redeploy adds to an older schema),
/// among other projects' rows, revoked rows and hours out of range: FIND in the index's order
/// (no sort, so a page reads COUNT + 1 rows however deep it is), TOP only the hours asked;
/// never a sequential scan.
#[test]
fn project_reads_use_their_indexes() {
    let fx = fixture!("project_explain");
    // A schema deployed before these indexes existed gets them in place from the next deploy.
    fx.exec(
        "DROP INDEX \"control_plane\".user_quota_replenishment_find_idx; \
         DROP INDEX \"control_plane\".user_quota_replenishment_find_expiry_idx; \
         DROP INDEX \"control_plane\".quota_usage_hourly_project_hour_idx;",
    );
    fx.store.deploy().expect("redeploy");
    fx.exec(
        "INSERT INTO \"control_plane\".user_quota_replenishment \
             (tenant, project, user_id, bundle_id, expires_at, active) \
         SELECT 't' || (i % 5), 'p' || (i % 4), 'user' || i, b, \
             CASE WHEN i % 2 = 0 THEN now() + i * interval '1 minute' END, i % 7 <> 0 \
         FROM generate_series(1, 20000) i, unnest(ARRAY['*', 'web']) b; \
         INSERT INTO \"control_plane\".quota_usage_hourly \
             (tenant, project, user_id, bundle_id, hour, requests, tokens) \
         SELECT 't' || (i % 5), 'p' || (i % 4), 'user' || (i % 3000), 'web', \
             to_timestamp(3600 * (490000 + h)), i % 17, i % 101 \
         FROM generate_series(1, 8000) i, generate_series(0, 23) h ON CONFLICT DO NOTHING; \
         ANALYZE \"control_plane\".user_quota_replenishment; \
         ANALYZE \"control_plane\".quota_usage_hourly;",
    );
    let sql = project::ProjectStatements::new(&fx.schema);
    let (t, p, user, bundle) = ("t1", "p1", "user5001", "*");
    let (limit, far, near, count) = (101_i64, 100_000_000_i64, 3_600_i64, 10_i64);
    let (secs, micros) = (now_ms() / 1000, 0_i64);
    let (from, to) = (3600 * 490_006_i64, 3600 * 490_012_i64);
    let (text, int) = (Type::TEXT, Type::INT8);
    // What, the statement, its parameters, the index it must read, whether in its order.
    type Case<'a> = (&'a str, &'a String, Vec<Param<'a>>, &'a str, bool);
    let cases: Vec<Case<'_>> = vec![
        (
            "FIND",
            &sql.find_first,
            vec![
                (&t, text.clone()),
                (&p, text.clone()),
                (&limit, int.clone()),
            ],
            "user_quota_replenishment_find_idx",
            true,
        ),
        (
            "FIND CURSOR",
            &sql.find_after,
            vec![
                (&t, text.clone()),
                (&p, text.clone()),
                (&user, text.clone()),
                (&bundle, text.clone()),
                (&limit, int.clone()),
            ],
            "user_quota_replenishment_find_idx",
            true,
        ),
        (
            "FIND EXPIRES_WITHIN",
            &sql.expiring_first,
            vec![
                (&t, text.clone()),
                (&p, text.clone()),
                (&far, int.clone()),
                (&limit, int.clone()),
            ],
            "user_quota_replenishment_find_expiry_idx",
            true,
        ),
        (
            "FIND EXPIRES_WITHIN CURSOR",
            &sql.expiring_after,
            vec![
                (&t, text.clone()),
                (&p, text.clone()),
                (&far, int.clone()),
                (&secs, int.clone()),
                (&micros, int.clone()),
                (&user, text.clone()),
                (&bundle, text.clone()),
                (&limit, int.clone()),
            ],
            "user_quota_replenishment_find_expiry_idx",
            true,
        ),
        // A near horizon holds few rows: reading them all from the index and sorting is fine.
        (
            "FIND EXPIRES_WITHIN 3600",
            &sql.expiring_first,
            vec![
                (&t, text.clone()),
                (&p, text.clone()),
                (&near, int.clone()),
                (&limit, int.clone()),
            ],
            "user_quota_replenishment_find_expiry_idx",
            false,
        ),
        (
            "TOP REQUESTS",
            &sql.top_requests,
            vec![
                (&t, text.clone()),
                (&p, text.clone()),
                (&from, int.clone()),
                (&to, int.clone()),
                (&count, int.clone()),
            ],
            "quota_usage_hourly_project_hour_idx",
            false,
        ),
        (
            "TOP TOKENS",
            &sql.top_tokens,
            vec![
                (&t, text.clone()),
                (&p, text.clone()),
                (&from, int.clone()),
                (&to, int.clone()),
                (&count, int.clone()),
            ],
            "quota_usage_hourly_project_hour_idx",
            false,
        ),
    ];
    for (what, statement, params, index, ordered) in cases {
        let plan = plan_of(&fx, statement, &params);
        eprintln!("{what}:\n{plan}\n");
        assert!(
            plan.contains(index),
            "{what} does not read {index}:\n{plan}"
        );
        assert!(!plan.contains("Seq Scan"), "{what}:\n{plan}");
        if ordered {
            assert!(
                !plan.contains("Sort"),
                "{what} sorts instead of reading in order:\n{plan}"
            );
        }
    }
}
