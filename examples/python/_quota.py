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
