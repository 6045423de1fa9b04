"""The Lua scripts, each built from ``lua/lib.lua`` (the shared pieces) and its own body, so
the standalone script and the cluster's per-slot halves have one source of truth."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from importlib import resources


class Script:
    """A Lua script, sent by SHA; re-sent whole when the server answers NOSCRIPT."""

    __slots__ = ("eval", "evalsha", "name", "retry_safe", "sha", "text")

    def __init__(self, name: str, text: str, *, retry_safe: bool) -> None:
        self.retry_safe = retry_safe
        """Running it twice errs toward under-delivery (never an overspend)."""
        self.name = name
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()
        self.evalsha = pack_args(("EVALSHA", self.sha))
        self.eval = pack_args(("EVAL", text))


def pack_args(args: Sequence[str | int]) -> bytes:
    """RESP-encode command arguments (no array header). Callers pack the parts of a script
    call that do not change per request once, and reuse the bytes."""
    out = []
    for arg in args:
        data = arg.encode() if isinstance(arg, str) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _load_script(name: str, *, retry_safe: bool) -> Script:
    lua = resources.files("xsp_middleware.store") / "lua"
    text = (lua / "lib.lua").read_text() + "\n" + (lua / f"{name}.lua").read_text()
    return Script(name, text, retry_safe=retry_safe)


# One server (standalone Redis, Sentinel's master, the embedded store): user and campaign in
# one atomic script.
RESERVE = _load_script("reserve", retry_safe=True)
RELEASE = _load_script("release", retry_safe=False)
PEEK = _load_script("peek", retry_safe=True)

# Redis Cluster: each script touches one slot (the campaign's or the user's).
RESERVE_CAMPAIGN = _load_script("reserve_campaign", retry_safe=True)
RESERVE_USER = _load_script("reserve_user", retry_safe=True)
RELEASE_USER = _load_script("release_user", retry_safe=False)
PEEK_USER = _load_script("peek_user", retry_safe=True)
CAMPAIGN_CONFIG = _load_script("campaign_config", retry_safe=True)

# Budget leasing (any topology): a grant, a report, or a return of unspent units. Each call
# carries a sequence number the script applies at most once, so sending it again is safe.
LEASE = _load_script("lease", retry_safe=True)

# The preferences app's writes (opt-out, blocks): admin calls, not on the decision path.
PREFS = _load_script("prefs", retry_safe=False)

# A leased decision runs only the user's half, on one server too.
STANDALONE_SCRIPTS = (RESERVE, RELEASE, PEEK, RESERVE_USER, RELEASE_USER, LEASE)
CLUSTER_SCRIPTS = (
    LEASE,
    RESERVE_CAMPAIGN,
    RESERVE_USER,
    RELEASE,
    RELEASE_USER,
    PEEK_USER,
    CAMPAIGN_CONFIG,
)
