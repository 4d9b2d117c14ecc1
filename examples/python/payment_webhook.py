"""A payment webhook that tops up a user's credits, safe against retries.

Payment providers deliver a webhook at least once: the same event can arrive
twice. QUOTA.GRANT ... ADD PURCHASE <payment id> applies a payment id only once
per (tenant, project); a repeat changes nothing and replies duplicate=1.

    REDIS_URL=redis://127.0.0.1:6379 python payment_webhook.py
"""

import uuid
from decimal import Decimal

from _quota import as_dict, connect

# What one "credit pack" buys, on every bundle ('*'), for good (no expiry).
PACK = {"REQUESTS_PER_DAY": 50, "TOKENS_PER_DAY": 100_000}


def handle_payment_succeeded(r, event):
    """The webhook handler: top up the payer's credits with one pack.

    Returns the stored record; record["duplicate"] == 1 when this payment was
    already applied (a webhook retry), in which case nothing changed.
    """
    payment = event["data"]["object"]
    meta = payment["metadata"]
    # Money is never a float: cents -> Decimal -> "10.00".
    amount = (Decimal(payment["amount"]) / 100).quantize(Decimal("0.01"))
    limits = [x for field, n in PACK.items() for x in (field, n)]
    return as_dict(
        r.execute_command(
            "QUOTA.GRANT", meta["tenant"], meta["project"], meta["user_id"], "*",
            *limits,
            "ADD",                       # top up: add to what the user already has
            "PURCHASE", payment["id"],   # idempotency key
            "AMOUNT", str(amount),
            "NOTES", f"credit pack ({event['id']})",
        )
    )


def payment_event(payment_id, user):
    """A trimmed-down 'payment_intent.succeeded' event, as a provider would post it."""
    return {
        "id": f"evt_{uuid.uuid4().hex[:12]}",
        "type": "payment_intent.succeeded",
        "data": {
            "object": {
                "id": payment_id,
                "amount": 1000,  # cents
                "currency": "usd",
                "metadata": {"tenant": "acme", "project": "chat-app", "user_id": user},
            }
        },
    }


def main():
    r = connect()
    user = f"buyer-{uuid.uuid4().hex[:8]}"
    pay_1 = f"pi_{uuid.uuid4().hex[:16]}"
    pay_2 = f"pi_{uuid.uuid4().hex[:16]}"

    def credits():
        return as_dict(r.execute_command("QUOTA.GET", "acme", "chat-app", user, "any-bundle"))

    assert credits() is None  # a new user has no credits

    # First delivery: the pack is applied.
    rec = handle_payment_succeeded(r, payment_event(pay_1, user))
    assert rec["duplicate"] == 0, rec
    assert rec["purchase_id"] == pay_1, rec
    assert rec["purchase_amount_usd"] == "10.00", rec
    assert rec["requests_per_day"] == 50, rec
    assert rec["expires_at"] is None, rec
    print(f"{pay_1}: applied, +50 requests/day, +100000 tokens/day")

    # The provider retries the same payment (same payment id, new event id).
    rec = handle_payment_succeeded(r, payment_event(pay_1, user))
    assert rec["duplicate"] == 1, rec
    print(f"{pay_1}: webhook retry -> duplicate=1, nothing changed")

    # The credit was applied once.
    got = credits()
    assert got["requests_per_day"] == 50, got
    assert got["tokens_per_day"] == 100_000, got
    assert got["purchase_amount_usd"] == "10.00", got

    # A second, different payment adds another pack on top.
    rec = handle_payment_succeeded(r, payment_event(pay_2, user))
    assert rec["duplicate"] == 0, rec
    got = credits()
    assert got["requests_per_day"] == 100, got
    assert got["tokens_per_day"] == 200_000, got
    assert got["purchase_id"] == pay_2, got
    assert got["purchase_amount_usd"] == "20.00", got  # what this row's purchases add up to
    print(f"{pay_2}: applied, now +100 requests/day, +200000 tokens/day, $20.00 paid")

    # The admission sees the credits: free tier of 10 requests/day + 100.
    d = as_dict(
        r.execute_command("QUOTA.ADMIT", "acme", "chat-app", user, "assistant", "REQUESTS_PER_DAY", 10)
    )
    assert d["allowed"] == 1 and d["credit"] == "global", d
    assert d["remaining_requests"] == 109, d
    print("ok")


if __name__ == "__main__":
    main()
