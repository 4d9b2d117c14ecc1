"""A 7-day trial bonus for a new user.

The free tier allows 10 requests a day. A new user gets +100 requests a day on
every bundle ('*') for 7 days, so QUOTA.ADMIT lets 110 requests through today,
then denies with reason requests_per_day and the seconds until the day ends
(UTC midnight).

    REDIS_URL=redis://127.0.0.1:6379 python trial_bonus.py
"""

import time
import uuid

from _quota import as_dict, connect

FREE_TIER = ["REQUESTS_PER_DAY", 10]  # the base policy, passed on every ADMIT
TRIAL_DAYS = 7


def main():
    r = connect()
    tenant, project = "acme", "chat-app"
    user = f"trial-{uuid.uuid4().hex[:8]}"  # a brand-new user
    bundle = "assistant"

    # Sign-up: grant the trial on every bundle ('*'), expiring in 7 days.
    grant = as_dict(
        r.execute_command(
            "QUOTA.GRANT", tenant, project, user, "*",
            "REQUESTS_PER_DAY", 100,
            "EXPIRES_IN", TRIAL_DAYS * 86400,
            "NOTES", "7-day trial",
        )
    )
    now = time.time()
    assert grant["duplicate"] == 0, grant
    assert grant["requests_per_day"] == 100, grant
    assert abs(grant["expires_at"] - (now + TRIAL_DAYS * 86400)) < 60, grant
    print(f"{user}: trial granted until {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(grant['expires_at']))}")

    def admit():
        return as_dict(r.execute_command("QUOTA.ADMIT", tenant, project, user, bundle, *FREE_TIER))

    # 10 requests fit the free tier; the next 100 run on the trial credit.
    for i in range(1, 111):
        d = admit()
        assert d["allowed"] == 1, (i, d)
        assert d["credit"] == "global", d  # the '*' row applies
        assert d["used_credit"] == (0 if i <= 10 else 1), (i, d)
        assert d["remaining_requests"] == 110 - i, (i, d)
    print("110 requests admitted (10 free + 100 trial)")

    # Request 111 is over today's effective limit.
    d = admit()
    assert d["allowed"] == 0, d
    assert d["reason"] == "requests_per_day", d
    seconds_to_midnight = 86400 - int(time.time()) % 86400
    assert 0 < d["retry_after"] <= 86400, d
    assert abs(d["retry_after"] - seconds_to_midnight) <= 2, (d, seconds_to_midnight)
    print(f"request 111 denied: {d['reason']}, retry after {d['retry_after']} s (UTC midnight)")

    # A denied request does not count.
    usage = as_dict(r.execute_command("QUOTA.USAGE", tenant, project, user, bundle))
    assert usage["requests_per_day"] == 110, usage
    print("ok")


if __name__ == "__main__":
    main()
