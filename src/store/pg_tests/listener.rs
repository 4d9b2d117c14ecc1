//! The NOTIFY listener against a real PostgreSQL: it reports a change once, reports the loss
//! of its backend, listens again, and stops promptly.

use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::super::listener::{Entry, Listener, ListenerEvent};
use super::*;

#[test]
fn listener_reports_changes_and_reconnects() {
    let fx = fixture!("listener");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&seen);
    let listener = Listener::spawn(
        fx.url.clone(),
        Default::default(),
        fx.schema.clone(),
        1000,
        Box::new(move |e| sink.lock().expect("lock").push(e)),
    )
    .expect("spawn");
    let wait_for = |pred: &dyn Fn(&[ListenerEvent]) -> bool| {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            if pred(&seen.lock().expect("lock")) {
                return true;
            }
            thread::sleep(Duration::from_millis(20));
        }
        false
    };
    assert!(
        wait_for(&|e| e.contains(&ListenerEvent::Connected)),
        "never connected"
    );
    let user = UserId {
        user: "ü\"ser",
        ..USER
    };
    fx.store
        .grant(&user, "b", &req(&[]), now_ms())
        .expect("grant");
    let changed = ListenerEvent::Changed {
        entry: Entry::User,
        tenant: "acme".into(),
        project: "chat".into(),
        id: "ü\"ser".into(),
        own: true,
    };
    assert!(
        wait_for(&|e| e.contains(&changed)),
        "no change seen: {:?}",
        seen.lock()
    );
    // A rolled-back duplicate sends nothing; count the changes so far.
    let times_seen = |event: &ListenerEvent| {
        seen.lock()
            .expect("lock")
            .iter()
            .filter(|e| *e == event)
            .count()
    };
    let before = times_seen(&changed);

    // Kill the listener's backend: it reports the loss and listens again.
    fx.client()
        .batch_execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = 'redis-quota-listener' AND pid <> pg_backend_pid()",
        )
        .expect("terminate");
    assert!(
        wait_for(&|e| e
            .iter()
            .any(|x| matches!(x, ListenerEvent::Disconnected(_)))),
        "loss not reported: {:?}",
        seen.lock()
    );
    assert!(
        wait_for(&|e| e.iter().filter(|x| **x == ListenerEvent::Connected).count() >= 2),
        "no reconnect: {:?}",
        seen.lock()
    );
    let mut r = req(&[]);
    r.purchase_id = Some("pi_l".into());
    fx.store.grant(&user, "b", &r, now_ms()).expect("grant");
    assert!(
        fx.store
            .grant(&user, "b", &r, now_ms())
            .expect("dup")
            .duplicate
    );
    assert!(wait_for(
        &|e| e.iter().filter(|x| **x == changed).count() > before
    ));
    thread::sleep(Duration::from_millis(500));
    let after = times_seen(&changed);
    assert_eq!(after, before + 1, "{:?}", seen.lock());

    let started = Instant::now();
    listener.stop();
    assert!(started.elapsed() < Duration::from_millis(600));
}
