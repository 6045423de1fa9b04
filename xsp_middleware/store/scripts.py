"""The Lua scripts, each built from ``lua/lib.lua`` (the shared pieces) and its own body, so
the standalone script and the cluster's per-slot halves have one source of truth."""

from __future__ import annotations

import hashlib
import re
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


_NAME = re.compile(r"\b(?:xsp|XSP)_\w+")
_DEFINES = re.compile(
    r"^local (?:function )?((?:xsp|XSP)_\w+(?:, *(?:xsp|XSP)_\w+)*)", re.MULTILINE
)


def _pieces(lib: str) -> tuple[str, list[tuple[frozenset[str], str]]]:
    """``lib.lua`` cut into its header and its top-level pieces: (the names each defines, its
    text with the comment above it). The header is the comment before the first blank
    line; each piece is its comment and definitions up to the next blank line."""
    blocks: list[list[str]] = [[]]
    for line in lib.splitlines(keepends=True):
        # A top-level piece starts at column 0 after a blank line (function bodies are indented).
        if line.startswith(("local ", "--")) and blocks[-1][-1:] == ["\n"]:
            blocks.append([])
        blocks[-1].append(line)
    header, *rest = ("".join(b) for b in blocks)
    return header, [
        (frozenset(_NAME.findall(" ".join(_DEFINES.findall(text)))), text) for text in rest
    ]


def _assemble(lib: str, body: str) -> str:
    """The script: the lib's definitions that ``body`` uses, directly or through each other,
    in their order in the lib, then the body. Building closures the call never runs costs
    server CPU on every call (about 2 us for the whole lib)."""
    header, pieces = _pieces(lib)
    defined = {name: text for names, text in pieces for name in names}
    needed: set[str] = set()
    todo = [n for n in _NAME.findall(_code(body)) if n in defined]
    while todo:
        name = todo.pop()
        if name in needed:
            continue
        needed.add(name)
        own = _code(defined[name])
        todo.extend(n for n in _NAME.findall(own) if n in defined and n not in needed)
    kept = [text for names, text in pieces if not names or names & needed]
    return header + "".join(kept) + "\n" + body


def _code(lua: str) -> str:
    """``lua`` without its comments: a piece a comment names is not one the code uses. (No
    string in the scripts holds ``--``.)"""
    return "\n".join(line.split("--")[0] for line in lua.splitlines())


def _load_script(name: str, *, retry_safe: bool) -> Script:
    lua = resources.files("xsp_middleware.store") / "lua"
    text = _assemble((lua / "lib.lua").read_text(), (lua / f"{name}.lua").read_text())
    return Script(name, text, retry_safe=retry_safe)


# One server (standalone Redis, Sentinel's master, the embedded store): user and campaign in
# one atomic script.
RESERVE = _load_script("reserve", retry_safe=True)
RELEASE = _load_script("release", retry_safe=False)
PEEK = _load_script("peek", retry_safe=True)

# Choosing among candidates: on one server, one script; on a cluster, the user's half over
# every candidate and each campaign's check (the chosen one's halves are the scripts above).
RESERVE_ANY = _load_script("reserve_any", retry_safe=True)
RESERVE_USER_ANY = _load_script("reserve_user_any", retry_safe=True)
CHECK_CAMPAIGN = _load_script("check_campaign", retry_safe=True)
COUNT_DENIALS = _load_script("count_denials", retry_safe=False)

# Redis Cluster: each script touches one slot (the campaign's or the user's).
RESERVE_CAMPAIGN = _load_script("reserve_campaign", retry_safe=True)
RESERVE_USER = _load_script("reserve_user", retry_safe=True)
RELEASE_USER = _load_script("release_user", retry_safe=False)
PEEK_USER = _load_script("peek_user", retry_safe=True)
CAMPAIGN_CONFIG = _load_script("campaign_config", retry_safe=True)

# Budget leasing (any topology): a grant, a report, or a return of unspent units. Each call
# carries a sequence number the script applies at most once, so sending it again is safe.
LEASE = _load_script("lease", retry_safe=True)

# Pending reservations (record_on=beacon): a beacon's confirm, a pending release; the
# campaign's side, then the user's.
BEACON = _load_script("beacon", retry_safe=False)
BEACON_USER = _load_script("beacon_user", retry_safe=False)

# The preferences app's writes (opt-out, blocks): admin calls, not on the decision path.
PREFS = _load_script("prefs", retry_safe=False)

# The dashboard's history: a campaign's counters, sampled once a minute (never by a decision).
SAMPLE = _load_script("sample", retry_safe=True)

# A leased decision runs only the user's half, on one server too.
STANDALONE_SCRIPTS = (RESERVE, RELEASE, PEEK, RESERVE_USER, RELEASE_USER, LEASE, RESERVE_ANY)
"""Preloaded on every connection (the beacon scripts load on first use: NOSCRIPT, then EVAL)."""
CLUSTER_SCRIPTS = (
    LEASE,
    RESERVE_CAMPAIGN,
    RESERVE_USER,
    RELEASE,
    RELEASE_USER,
    PEEK_USER,
    CAMPAIGN_CONFIG,
    RESERVE_USER_ANY,
    CHECK_CAMPAIGN,
)
