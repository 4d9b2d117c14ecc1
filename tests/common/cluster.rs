//! Redis Cluster: N masters, slots spread evenly.

use super::*;

/// N masters with `cluster-enabled yes` on loopback, the 16384 slots spread evenly
/// (what `redis-cli --cluster create` does, done with CLUSTER commands).
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// `masters` nodes, each from `builder` (module args, conf lines), cluster mode on.
    pub fn start(masters: usize, builder: RedisBuilder) -> RedisCluster {
        assert!(masters >= 1);
        let nodes: Vec<RedisServer> = (0..masters)
            .map(|_| builder.clone().cluster().start())
            .collect();
        let per = 16384 / masters;
        for (i, n) in nodes.iter().enumerate() {
            let first = i * per;
            let last = if i + 1 == masters {
                16383
            } else {
                (i + 1) * per - 1
            };
            let mut c = n.client();
            let _: Value = redis::cmd("CLUSTER")
                .arg("SET-CONFIG-EPOCH")
                .arg(i + 1)
                .query(&mut c)
                .expect("CLUSTER SET-CONFIG-EPOCH");
            let _: Value = redis::cmd("CLUSTER")
                .arg("ADDSLOTSRANGE")
                .arg(first)
                .arg(last)
                .query(&mut c)
                .expect("CLUSTER ADDSLOTSRANGE");
        }
        {
            let mut c = nodes[0].client();
            for n in &nodes[1..] {
                meet(&mut c, n);
            }
        }
        let cluster = RedisCluster { nodes };
        cluster.wait_ok(Duration::from_secs(60));
        cluster
    }

    /// Waits until every node says `cluster_state:ok` and knows every other node.
    pub fn wait_ok(&self, timeout: Duration) {
        let n = self.nodes.len().to_string();
        let ok = wait_until(timeout, || {
            self.nodes.iter().all(|node| {
                let mut c = node.client();
                let text: String = match redis::cmd("CLUSTER").arg("INFO").query(&mut c) {
                    Ok(t) => t,
                    Err(_) => return false,
                };
                let info = parse_info(&text);
                info.get("cluster_state").map(String::as_str) == Some("ok")
                    && info.get("cluster_known_nodes") == Some(&n)
                    && info.get("cluster_slots_assigned").map(String::as_str) == Some("16384")
            })
        });
        assert!(ok, "cluster did not reach cluster_state:ok in {timeout:?}");
    }

    /// `redis://127.0.0.1:<port>/` of every node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.url()).collect()
    }

    /// A cluster-aware connection (redis crate's cluster client), read timeout 60 s.
    pub fn cluster_client(&self) -> redis::cluster::ClusterConnection {
        let client = redis::cluster::ClusterClientBuilder::new(self.urls())
            .connection_timeout(Duration::from_secs(5))
            .build()
            .expect("cluster client");
        let con = client.get_connection().expect("cluster connection");
        con.set_read_timeout(Some(Duration::from_secs(60)))
            .expect("set_read_timeout");
        con
    }

    /// A replica of master `i`: a new node from `builder` (cluster mode on), met, made a
    /// replica with `CLUSTER REPLICATE` and synced. It is not one of [`RedisCluster::nodes`]
    /// (which are the masters the slots were spread over).
    pub fn add_replica(&self, i: usize, builder: RedisBuilder) -> RedisServer {
        let master = &self.nodes[i];
        let replica = builder.cluster().start();
        let mut c = replica.client();
        meet(&mut c, master);
        let id = node_id(master);
        // REPLICATE is refused until the new node knows the master.
        let ok = wait_until(Duration::from_secs(30), || {
            redis::cmd("CLUSTER")
                .arg("REPLICATE")
                .arg(&id)
                .query::<Value>(&mut c)
                .is_ok()
        });
        assert!(ok, "CLUSTER REPLICATE {id} was refused for 30 s");
        replica.wait_replica_synced(master, Duration::from_secs(60));
        replica
    }

    /// The node that serves `key`'s hash slot.
    pub fn node_for_key(&self, key: &str) -> &RedisServer {
        let mut c = self.nodes[0].client();
        let slot: i64 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut c)
            .expect("CLUSTER KEYSLOT");
        let per = 16384 / self.nodes.len() as i64;
        let idx = ((slot / per) as usize).min(self.nodes.len() - 1);
        &self.nodes[idx]
    }
}

/// `CLUSTER MEET` on `c`'s node: it joins `other`'s cluster (on loopback).
fn meet(c: &mut redis::Connection, other: &RedisServer) {
    let _: Value = redis::cmd("CLUSTER")
        .arg("MEET")
        .arg("127.0.0.1")
        .arg(other.port())
        .query(c)
        .expect("CLUSTER MEET");
}

/// `CLUSTER MYID` of a node.
pub fn node_id(node: &RedisServer) -> String {
    let mut c = node.client();
    redis::cmd("CLUSTER")
        .arg("MYID")
        .query(&mut c)
        .expect("CLUSTER MYID")
}

/// `INFO replication` `role` of a node: `master` or `slave`.
pub fn role(node: &RedisServer) -> String {
    node.info("replication")
        .get("role")
        .cloned()
        .unwrap_or_default()
}
