"""A VIP grant on one bundle, without expiry, on top of a plan for every bundle.

For a given bundle, the user's row for that bundle applies; only when there is
none (or it is revoked or expired) does the '*' row apply. The two are never
added together. Revoking the VIP row falls back to the '*' row.

    REDIS_URL=redis://127.0.0.1:6379 python vip.py
"""

import uuid

from _quota import as_dict, connect

BASE = ["REQUESTS_PER_DAY", 10, "MAX_CONCURRENT", 1]  # the free tier


def main():
    r = connect()
    t, p = "acme", "chat-app"
    user = f"vip-{uuid.uuid4().hex[:8]}"

    def cmd(name, *args):
        return as_dict(r.execute_command(name, t, p, user, *args))

    # A monthly plan on every bundle: +20 requests/day for 30 days.
    plan = cmd("QUOTA.GRANT", "*", "REQUESTS_PER_DAY", 20, "EXPIRES_IN", 30 * 86400, "NOTES", "pro plan")
    assert plan["bundle_id"] == "*" and plan["expires_at"] is not None, plan

    # VIP on the "gpt-4" bundle: +1000 requests/day, 5 more parallel calls, never expires.
    vip = cmd("QUOTA.GRANT", "gpt-4", "REQUESTS_PER_DAY", 1000, "MAX_CONCURRENT", 5, "NOTES", "VIP")
    assert vip["bundle_id"] == "gpt-4", vip
    assert vip["expires_at"] is None, vip  # no EXPIRES_* given: never expires
    print(f"{user}: '*' plan (+20/day, 30 days) and VIP on gpt-4 (+1000/day, no expiry)")

    # gpt-4 gets the VIP row; every other bundle gets the '*' row.
    assert cmd("QUOTA.GET", "gpt-4")["bundle_id"] == "gpt-4"
    assert cmd("QUOTA.GET", "claude")["bundle_id"] == "*"

    d = cmd("QUOTA.ADMIT", "gpt-4", *BASE, "LEASE_TTL", 60)
    assert d["allowed"] == 1 and d["credit"] == "bundle", d
    assert d["remaining_requests"] == 10 + 1000 - 1, d  # VIP only, not VIP + plan
    cmd("QUOTA.COMMIT", "gpt-4", 0, "LEASE", d["lease"])  # the call is done: free the slot

    d = cmd("QUOTA.ADMIT", "claude", *BASE, "LEASE_TTL", 60)
    assert d["allowed"] == 1 and d["credit"] == "global", d
    assert d["remaining_requests"] == 10 + 20 - 1, d
    cmd("QUOTA.COMMIT", "claude", 0, "LEASE", d["lease"])
    print("gpt-4 admits on the VIP row (bundle), claude on the plan ('*', global)")

    # VIP can run 1 + 5 calls at once on gpt-4; the 7th is refused.
    leases = []
    for _ in range(6):
        d = cmd("QUOTA.ADMIT", "gpt-4", *BASE, "LEASE_TTL", 60)
        assert d["allowed"] == 1, d
        leases.append(d["lease"])
    d = cmd("QUOTA.ADMIT", "gpt-4", *BASE, "LEASE_TTL", 60)
    assert d["allowed"] == 0 and d["reason"] == "concurrency", d
    for lease in leases:  # e.g. the upstream failed: give the requests back
        assert r.execute_command("QUOTA.RELEASE", t, p, user, "gpt-4", lease) == 1
    print("VIP: 6 concurrent gpt-4 calls admitted, the 7th denied (concurrency)")

    # The VIP period ends: revoke (soft delete). gpt-4 falls back to the '*' plan.
    assert r.execute_command("QUOTA.REVOKE", t, p, user, "gpt-4") == 1
    assert r.execute_command("QUOTA.REVOKE", t, p, user, "gpt-4") == 0  # already revoked
    got = cmd("QUOTA.GET", "gpt-4")
    assert got["bundle_id"] == "*", got
    d = cmd("QUOTA.ADMIT", "gpt-4", *BASE, "LEASE_TTL", 60)
    assert d["allowed"] == 1 and d["credit"] == "global", d
    # The 6 released requests were refunded: this is the 2nd gpt-4 request of the day.
    assert d["remaining_requests"] == 10 + 20 - 2, d
    cmd("QUOTA.COMMIT", "gpt-4", 0, "LEASE", d["lease"])
    print("after REVOKE, gpt-4 falls back to the '*' plan")

    # The revoked row is kept (soft delete): LIST ALL still shows it, inactive.
    everything = as_dict(r.execute_command("QUOTA.LIST", t, p, user, "ALL"))
    assert as_dict(everything["gpt-4"])["active"] == 0, everything
    active = as_dict(r.execute_command("QUOTA.LIST", t, p, user))
    assert list(active) == ["*"], active
    print("ok")


if __name__ == "__main__":
    main()
