//! The one Redis lock (`dashcache::lock`): a guard that renews while held and
//! gives the lock back however its holder ends.

use std::time::Duration;

use dashcache::config::RedisConfig;
use dashcache::lock::{self, Acquire};
use dashcache::redis_conn::{RedisConn, Timeouts};

use crate::harness::{redis_url, shared_prefix};

fn conn() -> RedisConn {
    let config = RedisConfig {
        url: redis_url(),
        ..RedisConfig::default()
    };
    RedisConn::open(&config, Timeouts::relaxed(Duration::from_secs(5))).expect("redis")
}

const TTL: Duration = Duration::from_secs(600);
const TIMEOUT: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_that_panics_gives_its_lock_back_at_once() {
    let conn = conn();
    let key = format!("{}:lock:{{panics}}", shared_prefix());
    let held = lock::acquire(&conn, key.clone(), "first", TTL, TIMEOUT)
        .await
        .expect("redis");
    let Acquire::Held(guard) = held else {
        panic!("a fresh key is not locked");
    };
    // Held: the next one is told who holds it.
    match lock::acquire(&conn, key.clone(), "second", TTL, TIMEOUT)
        .await
        .expect("redis")
    {
        Acquire::Busy { holder } => assert_eq!(holder.as_deref(), Some("first")),
        Acquire::Held(_) => panic!("two holders of one lock"),
    }
    // The holder's computation panics while it holds the guard.
    let crashed = tokio::spawn(async move {
        let _guard = guard;
        panic!("the computation failed");
    })
    .await;
    assert!(crashed.is_err_and(|e| e.is_panic()));
    // The lock is given back by the guard, not after its 10-minute TTL: a
    // waiter gets it within a bounded poll far shorter than that.
    let mut taken = None;
    for _ in 0..200 {
        if let Acquire::Held(guard) = lock::acquire(&conn, key.clone(), "second", TTL, TIMEOUT)
            .await
            .expect("redis")
        {
            taken = Some(guard);
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let guard = taken.expect("the lock of a panicked holder was not given back");
    guard.release().await;
    assert!(
        !lock::is_locked(&conn, &key, TIMEOUT).await.expect("redis"),
        "released explicitly"
    );
}
