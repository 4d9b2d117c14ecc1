"""What every Python example shares: reading QUOTA.* replies and connecting.

Not an example itself (examples/run.sh skips files starting with '_').
"""

import os

import redis


def as_dict(reply):
    """QUOTA.* replies are maps under RESP3 and flat [field, value, ...] arrays under RESP2."""
    if reply is None or isinstance(reply, dict):
        return reply
    return dict(zip(reply[0::2], reply[1::2]))


def connect():
    """A client for REDIS_URL (default redis://127.0.0.1:6379), strings decoded."""
    return redis.Redis.from_url(
        os.environ.get("REDIS_URL", "redis://127.0.0.1:6379"), decode_responses=True
    )


def cluster_policy_resolver():
    """A redis-py policy resolver for RedisCluster(policy_resolver=...) that knows QUOTA.CLEANUP.

    redis-py routes every keyed QUOTA.* command by its declared key (the user id; the tenant for
    QUOTA.POLICY) from COMMAND INFO, and routes a command without a key only when a resolver
    has a record of it. QUOTA.CLEANUP has no key and does its whole job from any one master, so
    its record says "any node"; redis-py's own records answer for everything else.
    """
    from redis._parsers.commands import CommandPolicies, RequestPolicy, ResponsePolicy
    from redis.commands.policies import BasePolicyResolver, StaticPolicyResolver

    any_node = CommandPolicies(
        request_policy=RequestPolicy.DEFAULT_KEYLESS,
        response_policy=ResponsePolicy.DEFAULT_KEYLESS,
    )

    class QuotaPolicyResolver(BasePolicyResolver):
        def __init__(self, fallback=None):
            super().__init__({"quota": {"cleanup": any_node}}, fallback)

        def with_fallback(self, fallback):
            return QuotaPolicyResolver(fallback)

    return QuotaPolicyResolver(StaticPolicyResolver())
