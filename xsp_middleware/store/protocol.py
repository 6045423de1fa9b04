"""What the Lua scripts answer, decoded in one place: the reason codes, one typed reply per
script, and the :class:`Reservation` a decision produces.

Nothing here does I/O. The async store, the blocking ``SyncStore`` and the cluster's split all
read script replies through these decoders, so a script's reply layout (documented at the top
of each ``lua/*.lua``) is written down once in Python, with named fields, next to its decoder.

The decoders check the shape (a list of the script's length) and return the reply as a
``NamedTuple`` without converting its values: integers arrive as ``int`` and strings as
``bytes`` (``text()`` turns one into ``str``). A reply of another shape raises
:class:`StoreUnavailable`, which every caller already handles as a failed store call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, NamedTuple

from ..errors import StoreUnavailable
from ..settings import CampaignConfig

Context = tuple[str, "str | None", bool]
"""A reservation's (campaign id, user key or None when anonymous, counts an impression)."""


class Reason(IntEnum):
    """The scripts' reason codes. 0-7 are decisions; 9-11 ask the app to act and retry."""

    SERVED = 0
    FREQUENCY_CAPPED = 1
    BUDGET_EXHAUSTED = 2
    CAMPAIGN_PAUSED = 3
    PACED = 4
    CAMPAIGN_INACTIVE = 5
    NO_CONSENT = 6
    USER_BLOCKED = 7
    TZ_RETRY = 9
    """The campaign's stored time zone differs from the one the app sent."""
    CAPS_RETRY = 10
    """The campaign's stored caps differ from the ones the app sent (cluster halves)."""
    LEASING_OFF = 11
    """Leasing is off in the store (lease.lua)."""
    ABOVE_MAX_CPM = 12
    """Bad input: the request's price is above the campaign's bid ceiling (``max_cpm``)."""
    SIGNATURE_REPLAYED = 13
    """Bad input: the request's price signature was used before."""
    NOT_SELECTED = 14
    """Choosing among candidates (``selection="weighted"``): eligible, but another was drawn."""


REASONS = tuple(r.name.lower() for r in Reason if r <= Reason.USER_BLOCKED)
"""The decision reasons by code: ``REASONS[code]`` is the ``X-XSP-Decision`` value."""

ANSWERS = (
    *REASONS,
    "retry",
    "retry",
    "retry",
    "retry",
    "above_max_cpm",
    "signature_replayed",
    "not_selected",
)
"""What a reserve reply's reason code means, by code: the decisions, then (12, 13) the bad
input the store found (answered as a 400: see :data:`INVALID_REASONS`), then (14) a candidate
that was eligible but not drawn."""

NO_ELIGIBLE = "no_eligible_campaign"
"""The decision when several candidates were named and none was eligible."""

INVALID_REASONS = frozenset({"above_max_cpm", "signature_replayed"})
"""Reasons that are the request's fault: a 400, not a denial."""

RETRY_REASONS = (Reason.TZ_RETRY, Reason.CAPS_RETRY)

BUDGET_REASONS = (Reason.BUDGET_EXHAUSTED, Reason.PACED)
"""Campaign denials that come after the user's checks in the standalone script: the user's
remaining impressions are known then."""


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


_tuple_new = tuple.__new__


def _shape(raw: Any, size: int, script: str) -> None:
    if not isinstance(raw, list) or len(raw) != size:
        raise StoreUnavailable(f"unexpected reply from the {script} script: {raw!r}")


def user_log(raw: str | None) -> tuple[int, list[int]]:
    """A user's impression log for one campaign (a field of the user's hash), as the scripts
    keep it (lib.lua's xsp_read_log): ``"<lifetime count>|<t1>,<t2>,..."`` (ms, oldest first),
    or the compact form of a first impression, ``"<t1>"``. (lifetime count, times)."""
    if not raw:
        return 0, []
    head, bar, tail = raw.partition("|")
    if not bar:
        return (1, [int(head)]) if head.isdecimal() else (0, [])
    times = [int(t) for t in tail.split(",") if t.isdecimal()]
    return (int(head) if head.isdecimal() else 0), times


def held_times(raw: str | None, now_ms: int) -> list[int]:
    """The times of a user's pending impressions still held at ``now_ms`` (the ``~<campaign>``
    field, as lib.lua's xsp_read_pending reads it: ``"<t>:<held until>:<id>,..."``)."""
    held = []
    for entry in (raw or "").split(","):
        t, _, rest = entry.partition(":")
        until = rest.partition(":")[0]
        if t.isdecimal() and until.isdecimal() and int(until) > now_ms:
            held.append(int(t))
    return held


class CampaignReply(NamedTuple):
    """``reserve.lua`` (user and campaign on one server) and ``reserve_campaign.lua`` (the
    campaign's half on a cluster)."""

    passed: int
    """1 reserved, 0 denied."""
    reason: int
    cost: int
    remaining: int
    """Remaining budget units (after this reservation when it passed)."""
    left: int
    """Remaining impressions under the caps (-1: no caps, or the campaign's half)."""
    at_ms: int
    fired: int
    """Exhaustion this decision fired: 0 none, 1 lifetime, 2 daily."""
    day_start_ms: int
    """0: no daily budget."""
    logs: int
    """Which user logs it wrote: 1 the campaign's, 2 across campaigns (a sum)."""
    config: bytes
    """The stored time zone (reason 9), caps (reason 10) or bid ceiling (reason 12); when
    served pending (``record_on="beacon"``), the reservation's id; otherwise empty."""
    personal: int
    """1 if the user's state was used (0: a stored opt-out left it alone)."""
    leasing: bytes
    """The stored leasing flag: ``1``, ``0`` or empty (unset)."""


def campaign_reply(raw: Any) -> CampaignReply:
    # Inlined checks and tuple.__new__ (not _make): this runs once per decision.
    if not isinstance(raw, list) or len(raw) != 12:
        raise StoreUnavailable(f"unexpected reply from the reserve script: {raw!r}")
    return _tuple_new(CampaignReply, raw)


class UserReply(NamedTuple):
    """``reserve_user.lua``: the user's half (a cluster, or a decision paid by a lease)."""

    passed: int
    reason: int
    left: int
    at_ms: int
    logs: int
    personal: int
    campaign_dropped: bytes
    """Times (ms, comma-separated) the write dropped from the campaign's log: an undo puts
    them back. (A pending reservation's, ``logs`` >= 4: its id, which its undo needs.)"""
    user_dropped: bytes
    """The same for the log across campaigns."""


def user_reply(raw: Any) -> UserReply:
    if not isinstance(raw, list) or len(raw) != 8:
        raise StoreUnavailable(f"unexpected reply from the user's script: {raw!r}")
    return _tuple_new(UserReply, raw)


class LeaseReply(NamedTuple):
    """``lease.lua``: a grant, a report or a return."""

    granted: int
    reason: int
    units: int
    remaining: int
    """Remaining budget after the grant; negative when the campaign is over a lowered budget."""
    now_ms: int
    day_start_ms: int
    valid_ms: int
    """How long the grant may be used (the end of the day, flight or pacing period)."""
    timezone: bytes
    caps: bytes
    price: bytes
    leasing: bytes


def lease_reply(raw: Any) -> LeaseReply:
    _shape(raw, 11, "lease")
    return LeaseReply._make(raw)


class PeekReply(NamedTuple):
    """``peek.lua`` and ``peek_user.lua``: whether the user could be served, read-only."""

    ok: int
    left: int
    """Remaining impressions (-1: no caps)."""


def peek_reply(raw: Any) -> PeekReply:
    _shape(raw, 2, "peek")
    return PeekReply._make(raw)


class ConfigReply(NamedTuple):
    """``campaign_config.lua``: the stored time zone and caps."""

    timezone: bytes
    caps: bytes


def config_reply(raw: Any) -> ConfigReply:
    _shape(raw, 2, "campaign config")
    return ConfigReply._make(raw)


class PrefsReply(NamedTuple):
    """``prefs.lua``: the user's stored preferences after a write."""

    opted_out: bytes
    """Empty when unset."""
    blocked: bytes
    """The blocked campaign ids, empty when none."""
    status: int
    """0: refused, too many blocked campaigns; 1: written."""


def prefs_reply(raw: Any) -> PrefsReply:
    _shape(raw, 3, "preferences")
    if not isinstance(raw[2], int):
        raise StoreUnavailable(f"unexpected reply from the preferences script: {raw!r}")
    return PrefsReply._make(raw)


@dataclass(slots=True)  # not frozen: one is built per decision, and frozen init is slow
class Reservation:
    """What the reserve script answered, plus what a release needs."""

    reserved: bool
    reason: str
    cost_units: int
    remaining_budget_units: int | None
    """None when the campaign's shard could not answer (a degraded cluster decision)."""
    remaining_impressions: int | None
    at_ms: int
    campaign_id: str
    user_key: str | None
    counts_impression: bool = True
    day_start_ms: int = 0
    logs: int = 0
    """Which user logs the reservation wrote (1: the campaign's, 2: across campaigns)."""
    personalized: bool = True
    """False when a stored opt-out made the script leave the user's state alone."""
    campaign_held: bool = True
    """The campaign's spend is held (false only when a cluster's campaign shard failed)."""
    degraded: str | None = None
    """Why one half of a cluster reservation failed, when the failure policy served anyway."""
    degraded_check: str | None = None
    """Which check that failure skipped: ``budget`` or ``frequency``."""
    lease: int | None = None
    """The generation of the budget lease that paid for it (None: the store's spend did)."""
    pending: str | None = None
    """``record_on="beacon"``: the id of the pending reservation its beacon confirms."""


class BeaconReply(NamedTuple):
    """``beacon.lua``: a pending reservation confirmed or released on its campaign's side."""

    outcome: int
    """1 confirmed (or released); 0 not pending (confirmed before, settled, unknown); 2 it had
    expired."""
    now_ms: int
    user_key: bytes
    """The user hash that holds its pending entries (empty: none)."""


def beacon_reply(raw: Any) -> BeaconReply:
    _shape(raw, 3, "beacon")
    if not isinstance(raw[0], int) or not isinstance(raw[1], int):
        raise StoreUnavailable(f"unexpected reply from the beacon script: {raw!r}")
    return BeaconReply._make(raw)


def reservation(
    context: Context,
    reserved: bool,
    reason: int,
    *,
    cost: int,
    remaining: int | None,
    left: int,
    at: int,
    day: int = 0,
    logs: int = 0,
    personal: int = 1,
    held: bool = True,
    degraded: str | None = None,
    check: str | None = None,
    lease: int | None = None,
    pending: str | None = None,
) -> Reservation:
    """The one place a Reservation is built from script answers: ``left`` < 0 means no cap
    applies, a negative ``remaining`` is none left (None: unknown, the campaign's half failed)."""
    campaign_id, user_key, counts = context
    return Reservation(
        reserved,
        ANSWERS[reason],
        cost,
        None if remaining is None else max(0, remaining),
        None if left < 0 else left,
        at,
        campaign_id,
        user_key,
        counts,
        day,
        logs,
        personal == 1,
        held,
        degraded,
        check,
        lease,
        pending,
    )


def reservation_from(context: Context, raw: Any) -> Reservation:
    """A standalone reserve script's raw reply (see reserve.lua) as a Reservation."""
    try:
        return reserved_by(context, campaign_reply(raw))
    except (TypeError, ValueError, IndexError):
        raise StoreUnavailable(f"unexpected reply from the reserve script: {raw!r}") from None


@dataclass(frozen=True, slots=True)
class Packed:
    """A campaign's packed reserve arguments, valid for one local day and zone."""

    tz: str
    since: int
    until: int
    """The packed calendar holds from ``since`` until ``until`` (the next local midnight)."""
    rule: CampaignConfig
    keys: bytes
    argv: bytes
    user_tail: bytes
    """A cluster's user half: the calendar arguments after the campaign's caps."""
    slot: int
    bounds: str
    """The campaign's calendar bounds."""
    profile: bytes
    """Its fallback config (but its caps, which each candidate brings), zone, calendar, weight
    and ceiling in a reserve_any.lua call (13 arguments, see lib.lua's xsp_profile): a profile
    that candidates whose settings differ at most in their caps share."""


def reserved_by(context: Context, reply: CampaignReply) -> Reservation:
    """What a decoded reserve reply means: ``reservation`` for the commonest answer, with its
    arguments in place (this runs once per decision; keyword calls cost)."""
    campaign_id, user_key, counts = context
    remaining, left = reply.remaining, reply.left
    made = Reservation(
        reply.passed == 1,
        ANSWERS[reply.reason],
        reply.cost,
        max(0, remaining),
        None if left < 0 else left,
        reply.at_ms,
        campaign_id,
        user_key,
        counts,
        reply.day_start_ms,
        reply.logs,
        reply.personal == 1,
    )
    if reply.config and reply.passed == 1:
        made.pending = text(reply.config)
    return made


class ChoiceReply(NamedTuple):
    """``reserve_any.lua``: the chosen candidate's reply (as reserve.lua's), its index, and
    what every evaluated candidate got."""

    reply: CampaignReply
    chosen: int
    """1-based; 0 when none was eligible (or, with reason 9, the candidate to retry for)."""
    outcomes: list[tuple[int, int]]
    """(reason code, exhaustion fired) of each evaluated candidate, in order."""


def outcome_codes(raw: Any) -> list[tuple[int, int]]:
    """The scripts' per-candidate outcomes, one character each: (reason, exhaustion fired),
    from ``ord('0') + reason + 16 * fired``."""
    if not isinstance(raw, bytes):
        raise TypeError(f"outcomes: {raw!r}")
    return [((v - 48) % 16, (v - 48) // 16) for v in raw]


def choice_reply(raw: Any) -> ChoiceReply:
    _shape(raw, 14, "reserve_any")
    try:
        return ChoiceReply(campaign_reply(raw[:12]), int(raw[12]), outcome_codes(raw[13]))
    except (TypeError, ValueError):
        raise StoreUnavailable(f"unexpected reply from the reserve_any script: {raw!r}") from None


class UserChoiceReply(NamedTuple):
    """``reserve_user_any.lua``: the user's half for the candidate it wrote, every candidate's
    user reason (0: passes), and which candidate it wrote."""

    user: UserReply
    reasons: list[int]
    written: int
    """1-based; 0: none."""
    lefts: list[int]
    """Each candidate's remaining impressions for this user after one more (-1: no caps)."""


def user_choice_reply(raw: Any) -> UserChoiceReply:
    _shape(raw, 11, "reserve_user_any")
    try:
        reasons = [r for r, _ in outcome_codes(raw[8])]
        if not isinstance(raw[10], list):
            raise TypeError(f"lefts: {raw[10]!r}")
        lefts = [int(v) for v in raw[10]]
        return UserChoiceReply(user_reply(raw[:8]), reasons, int(raw[9]), lefts)
    except (TypeError, ValueError):
        raise StoreUnavailable(f"unexpected reply from the user's script: {raw!r}") from None


class CheckReply(NamedTuple):
    """``check_campaign.lua``: whether a candidate's campaign could pay now."""

    reason: int
    fired: int
    timezone: bytes
    caps: bytes
    weight: int
    leasing: bytes
    remaining: int
    """Budget left, in units (the lifetime's or the local day's, whichever is smaller)."""
    cost: int


def check_reply(raw: Any) -> CheckReply:
    _shape(raw, 8, "check_campaign")
    if not isinstance(raw[0], int) or not isinstance(raw[4], int):
        raise StoreUnavailable(f"unexpected reply from the check script: {raw!r}")
    return CheckReply._make(raw)


@dataclass(slots=True)
class Choice:
    """What choosing among candidates produced: the chosen candidate's reservation (None when
    none was eligible) and, in order, each evaluated candidate's (campaign id, reason)."""

    reservation: Reservation | None
    outcomes: list[tuple[str, str]]
    later: list[Any] = field(default_factory=list)
    """Calls to send without waiting (a cluster's: passed-over candidates' denial counts, a
    compensation)."""
