"""Guarding LLM calls: ADMIT before the call, COMMIT the tokens after it.

The policy: at most 2 calls in flight, 5000 tokens a day. Each ADMIT reserves
1000 tokens (an estimate) under a lease, so parallel calls cannot overshoot the
budget by much; COMMIT records the tokens the call really used and frees the
lease; RELEASE gives the request back when the call failed.

    REDIS_URL=redis://127.0.0.1:6379 python admit_commit_loop.py
"""

import random
import time
import uuid

from _quota import as_dict, connect

POLICY = ["MAX_CONCURRENT", 2, "TOKENS_PER_DAY", 5000]
ESTIMATE = 1000  # tokens reserved per call until it commits


class UpstreamError(Exception):
    pass


def fake_llm_call(prompt, rng):
    """Stands in for the model: fails now and then, else returns the tokens it used."""
    if rng.random() < 0.2:
        raise UpstreamError("503 from the model provider")
    return rng.randint(300, 900)


def main():
    r = connect()
    account = ("acme", "chat-app", f"llm-{uuid.uuid4().hex[:8]}", "gpt-4")
    rng = random.Random(42)

    def admit():
        return as_dict(
            r.execute_command("QUOTA.ADMIT", *account, *POLICY, "RESERVE", ESTIMATE, "LEASE_TTL", 120)
        )

    # Two calls may run at once; a third one waits for a free slot.
    a, b = admit(), admit()
    assert a["allowed"] == 1 and b["allowed"] == 1, (a, b)
    assert a["reserved"] == ESTIMATE and a["lease"] != b["lease"], (a, b)
    c = admit()
    assert c["allowed"] == 0 and c["reason"] == "concurrency", c
    assert c["retry_after"] > 0, c  # until a lease expires at the latest
    for lease in (a["lease"], b["lease"]):
        assert r.execute_command("QUOTA.RELEASE", *account, lease) == 1
    print("MAX_CONCURRENT 2: the 3rd parallel call was denied (concurrency)")

    # The request loop, one call at a time, until the daily token budget is spent.
    committed = calls = failures = 0
    while True:
        d = admit()
        if not d["allowed"]:
            break
        lease = d["lease"]
        try:
            used = fake_llm_call(f"question {calls}", rng)
        except UpstreamError:
            # Error path: free the slot, drop the reservation, refund the request.
            assert r.execute_command("QUOTA.RELEASE", *account, lease) == 1
            failures += 1
            continue
        c = as_dict(r.execute_command("QUOTA.COMMIT", *account, used, "LEASE", lease))
        assert c["tokens"] == used and c["duplicate"] == 0 and c["lease_held"] == 1, c
        # A retried COMMIT (e.g. after a timeout) does not count twice.
        again = as_dict(r.execute_command("QUOTA.COMMIT", *account, used, "LEASE", lease))
        assert again["tokens"] == 0 and again["duplicate"] == 1, again
        committed += used
        calls += 1
        print(f"call {calls}: {used} tokens (reserved {d['reserved']}), {committed} so far")
        assert calls + failures < 100, "the budget should run out long before this"

    # The loop stopped because the day's tokens are spent.
    assert d["reason"] == "tokens_per_day", d
    seconds_to_midnight = 86400 - int(time.time()) % 86400
    assert abs(d["retry_after"] - seconds_to_midnight) <= 2, d
    assert committed >= 5000 - ESTIMATE, committed
    print(f"denied: {d['reason']}, retry after {d['retry_after']} s; {failures} failed calls released")

    usage = as_dict(r.execute_command("QUOTA.USAGE", *account))
    assert usage["tokens_per_day"] == committed, (usage, committed)
    assert usage["tokens_per_month"] == committed, usage
    assert usage["requests_per_day"] == calls, (usage, calls)  # released calls were refunded
    assert usage["in_flight"] == 0 and usage["reserved"] == 0, usage
    print(f"usage: {usage['requests_per_day']} requests, {usage['tokens_per_day']} tokens, nothing in flight")
    print("ok")


if __name__ == "__main__":
    main()
