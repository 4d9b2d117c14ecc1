"""redis-py's RedisCluster with QUOTA.*: every command routes by itself, no target_nodes.

RedisCluster reads COMMAND INFO, so QUOTA.ADMIT, USAGE, ... (whose declared key is the user
id) go straight to the node that owns the user, alone or in a pipeline; QUOTA.POLICY SET, GET,
DEL and LIST, QUOTA.FIND and QUOTA.TOP (whose declared key is the tenant) to the node that owns
the tenant, a FIND page after page with its cursor. QUOTA.CLEANUP
has no key and does its whole job from any one node: with a resolver that has a record of it
(_quota.cluster_policy_resolver), redis-py sends it to a random master. QUOTA.POLICY HELP and
QUOTA.POLICY INVALIDATE have no key either, and share QUOTA.POLICY's name with the keyed
subcommands (a resolver's record would apply to them all): they take target_nodes.
Checks that the masters sent no MOVED (INFO errorstats) while doing it.

    QUOTA_CLUSTER_NODES=127.0.0.1:7001,127.0.0.1:7002 python cluster_routing.py
Without QUOTA_CLUSTER_NODES it has nothing to do and says so.
"""

import os
import uuid

from redis.cluster import ClusterNode, RedisCluster
from _quota import as_dict, cluster_policy_resolver


def moved(rc):
    """MOVED replies the masters have sent so far."""
    stats = [n.redis_connection.info("errorstats") for n in rc.get_primaries()]
    return sum(int(s.get("errorstat_MOVED", {}).get("count", 0)) for s in stats)


def main():
    nodes = [n for n in os.environ.get("QUOTA_CLUSTER_NODES", "").split(",") if n]
    if not nodes:
        print("QUOTA_CLUSTER_NODES not set: nothing to do")
        return
    protocol = 3 if "protocol=3" in os.environ.get("REDIS_URL", "") else 2
    startup = [ClusterNode(n.split(":")[0], int(n.split(":")[1])) for n in nodes]
    rc = RedisCluster(
        startup_nodes=startup,
        decode_responses=True,
        protocol=protocol,
        policy_resolver=cluster_policy_resolver(),
    )
    t, p = "acme", "chat-app"
    users = [f"rc-{uuid.uuid4().hex[:8]}-{i}" for i in range(200)]
    before = moved(rc)

    for user in users:
        r = as_dict(rc.execute_command("QUOTA.ADMIT", t, p, user, "web", "REQUESTS_PER_DAY", 5))
        assert r["allowed"] == 1, r
    pipe = rc.pipeline()
    for user in users:
        pipe.execute_command("QUOTA.USAGE", t, p, user, "web")
    usage = [as_dict(u) for u in pipe.execute()]
    assert all(u["requests_per_day"] == 1 for u in usage), usage[:3]

    # A named policy, routed by its tenant; every node decides with it.
    policy = as_dict(rc.execute_command("QUOTA.POLICY", "SET", t, p, "free", "REQUESTS_PER_DAY", 7))
    assert policy["requests_per_day"] == 7, policy
    got = as_dict(rc.execute_command("QUOTA.POLICY", "GET", t, p, "free"))
    assert got["requests_per_day"] == 7, got
    r = as_dict(rc.execute_command("QUOTA.ADMIT", t, p, users[0], "web", "POLICY", "free"))
    assert r["allowed"] == 1, r

    # Keyless subcommands go where the caller says: HELP to any node, INVALIDATE to every
    # master (each replicates it to its replicas).
    lines = rc.execute_command("QUOTA.POLICY", "HELP", target_nodes=RedisCluster.RANDOM)
    assert lines[-1] == "    Print this help.", lines
    dropped = rc.execute_command(
        "QUOTA.POLICY", "INVALIDATE", t, p, "free", target_nodes=RedisCluster.PRIMARIES
    )
    assert set(dropped.values()) <= {0, 1}, dropped

    # The project reads, routed by their tenant: every credit of the project page by page (the
    # users granted here among them), and the users who made the most requests.
    granted = set(users[:5])
    for user in granted:
        rc.execute_command("QUOTA.GRANT", t, p, user, "*", "REQUESTS_PER_DAY", 3)
    cursor, seen = "0", set()
    while True:
        cursor, records = rc.execute_command("QUOTA.FIND", t, p, "COUNT", 2, "CURSOR", cursor)
        seen.update(as_dict(r)["user_id"] for r in records)
        if cursor == "0":
            break
    assert granted <= seen, granted - seen
    top = rc.execute_command("QUOTA.TOP", t, p, "REQUESTS", "FROM", 0, "TO", 253402300800, "COUNT", 3)
    assert len(top) <= 3 and all("user_id" in as_dict(u) for u in top), top

    # CLEANUP on any one master: it deactivates every expired row (PostgreSQL is shared).
    cleaned = rc.execute_command("QUOTA.CLEANUP")
    assert int(cleaned) >= 0, cleaned

    sent = moved(rc) - before
    assert sent == 0, f"the masters sent {sent} MOVED"
    print(
        f"{len(users)} ADMIT + a pipeline of USAGE across users, POLICY SET/GET, "
        f"FIND ({len(seen)} users) and TOP, 0 MOVED; CLEANUP {cleaned}"
    )
    rc.close()


if __name__ == "__main__":
    main()
