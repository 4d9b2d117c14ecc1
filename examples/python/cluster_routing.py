"""redis-py's RedisCluster with QUOTA.*: keyed commands route by the user, CLEANUP by hand.

RedisCluster reads COMMAND INFO, so QUOTA.ADMIT, USAGE, ... (whose declared key is the user
id) go straight to the node that owns the user, alone or in a pipeline. QUOTA.CLEANUP has no
key; its command tips say "all masters, sum the replies", which redis-py 8.1 does not apply
by itself (its default policy resolver ignores module tips), so name the masters and sum.
Checks that the masters sent no MOVED (INFO errorstats) while doing it.

    QUOTA_CLUSTER_NODES=127.0.0.1:7001,127.0.0.1:7002 python cluster_routing.py
Without QUOTA_CLUSTER_NODES it has nothing to do and says so.
"""

import os
import uuid

from redis.cluster import ClusterNode, RedisCluster
from _quota import as_dict


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
    rc = RedisCluster(startup_nodes=startup, decode_responses=True, protocol=protocol)
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
    assert all(u["req_day"] == 1 for u in usage), usage[:3]

    # CLEANUP on every master; an advisory lock lets one of them do the work.
    per_node = rc.execute_command("QUOTA.CLEANUP", target_nodes=rc.get_primaries())
    assert len(per_node) == len(rc.get_primaries()), per_node
    cleaned = sum(per_node.values())
    assert cleaned >= 0, per_node

    sent = moved(rc) - before
    assert sent == 0, f"the masters sent {sent} MOVED"
    print(f"{len(users)} ADMIT + a pipeline of USAGE across users, 0 MOVED; CLEANUP {per_node}")
    rc.close()


if __name__ == "__main__":
    main()
