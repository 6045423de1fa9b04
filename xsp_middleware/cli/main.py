"""The ``xsp-middleware`` command line: campaigns, users, ``doctor``, ``demo``, ``dashboard``,
``sign-price``.

Every command reads ``XSP_REDIS_URL`` (and every other ``XSP_*`` setting); ``--redis-url``
overrides it. Errors are one line on stderr with exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import urllib.parse
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime
from typing import Any

from ..clock import format_instant
from ..errors import ConfigError, XSPError
from ..money import format_units
from ..preferences import (
    block_campaign,
    forget_user,
    get_preferences,
    set_opted_out,
    unblock_campaign,
)
from ..settings import PACINGS, Rules, Settings, validate_campaign_id
from ..signing import MAX_TTL, sign_price
from ..store import CampaignView, Store

Command = Callable[[argparse.Namespace, Store], Coroutine[Any, Any, int]]


class UsageError(XSPError):
    """A command that cannot be carried out as asked (exit code 2)."""


def _parser() -> argparse.ArgumentParser:
    common = _ArgumentParser(add_help=False)
    common.add_argument(
        "--redis-url",
        default=argparse.SUPPRESS,
        help="store URL (default: $XSP_REDIS_URL); redis://, rediss://, unix:// or memory://",
    )
    parser = _ArgumentParser(
        prog="xsp-middleware",
        description="Run campaigns on the xsp-middleware store: exact caps, budgets, pacing.",
        parents=[common],
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_ArgumentParser)

    campaign = commands.add_parser("campaign", help="create, inspect, pause and delete campaigns")
    actions = campaign.add_subparsers(dest="action", required=True, parser_class=_ArgumentParser)
    set_ = actions.add_parser(
        "set", parents=[common], help="create or update a campaign (unset options keep values)"
    )
    set_.add_argument("id")
    set_.add_argument("--budget", metavar="D", help="lifetime budget, e.g. 500.00")
    set_.add_argument("--daily-budget", metavar="D", help="budget per local day")
    set_.add_argument("--timezone", metavar="TZ", help="IANA zone of days (default UTC)")
    set_.add_argument("--start", metavar="ISO", help="flight start (date or date-time)")
    set_.add_argument("--end", metavar="ISO", help="flight end (a bare date is included)")
    set_.add_argument(
        "--cap",
        metavar="N/W",
        action="append",
        help="3/1h, 5/1d, 4/day, 10/week, 50/lifetime...; repeat for several (replaces all)",
    )
    set_.add_argument("--cpm", metavar="D", help="price when a request carries none")
    set_.add_argument(
        "--max-cpm",
        metavar="D",
        help="bid ceiling: a request price above it is a 400 ('none' removes it)",
    )
    set_.add_argument("--pacing", choices=PACINGS, help="delivery pacing")
    set_.add_argument(
        "--weight",
        metavar="N",
        help='relative chance of being chosen under selection="weighted", 1 to 1000000 (default 1)',
    )
    set_.add_argument(
        "--leasing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="spend the budget from per-process leases (hot campaigns); --no-leasing: off",
    )
    for name, help_text in (
        ("show", "print a campaign, its spend and its pacing"),
        ("pause", "stop serving a campaign (campaign_paused)"),
        ("resume", "serve a paused or exhausted campaign again"),
        ("delete", "forget a campaign's stored config and state"),
    ):
        sub = actions.add_parser(name, parents=[common], help=help_text)
        sub.add_argument("id")
        if name == "show":
            sub.add_argument("--json", action="store_true", help="print JSON")
    listing = actions.add_parser("list", parents=[common], help="list campaigns")
    listing.add_argument("--json", action="store_true", help="print JSON")

    user = commands.add_parser(
        "user", help="inspect and reset a user's impressions; opt-out, blocks, erasure"
    )
    user_actions = user.add_subparsers(dest="action", required=True, parser_class=_ArgumentParser)
    for name, help_text in (
        ("show", "impressions in each cap window and when each cap frees up"),
        ("reset", "forget the user's impressions"),
    ):
        sub = user_actions.add_parser(name, parents=[common], help=help_text)
        sub.add_argument("user_id")
        sub.add_argument("--campaign", metavar="ID", help="only this campaign")
        if name == "show":
            sub.add_argument("--json", action="store_true", help="print JSON")
    for name, help_text in (
        ("opt-out", "opt the user out: no tracking (the consent policy decides what that means)"),
        ("opt-in", "undo opt-out"),
        ("block", "never show the user this campaign"),
        ("unblock", "undo block"),
        ("forget", "erase everything stored for the user (impressions and preferences)"),
    ):
        sub = user_actions.add_parser(name, parents=[common], help=help_text)
        sub.add_argument("user_id")
        if name in ("block", "unblock"):
            sub.add_argument("campaign_id")

    doctor = commands.add_parser(
        "doctor", parents=[common], help="check the store: version, scripts, eviction, persistence"
    )
    doctor.add_argument("--json", action="store_true", help="print JSON")

    demo = commands.add_parser(
        "demo", parents=[common], help="run the example ad server under simulated traffic"
    )
    demo.add_argument(
        "--serve",
        action="store_true",
        help="serve the demo ad server, and its dashboard at /dashboard/, on 127.0.0.1:8000",
    )
    demo.add_argument("--port", type=int, default=8000, help="with --serve: the port (8000)")
    demo.add_argument("--plot", metavar="FILE.png", help="chart even pacing over a simulated day")
    demo.add_argument("--users", type=int, default=2000, help="simulated users (default 2000)")

    dashboard = commands.add_parser(
        "dashboard",
        parents=[common],
        help="serve the operator dashboard: spend against pacing, denials, pause and budgets",
    )
    dashboard.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to serve on (default 127.0.0.1; any other needs XSP_DASHBOARD_TOKEN)",
    )
    dashboard.add_argument("--port", type=int, default=8001, help="port (default 8001)")

    signer = commands.add_parser(
        "sign-price",
        help="sign a price for price_source=signed: print the query string to append",
    )
    signer.add_argument("campaign_id")
    signer.add_argument("cpm", help="the CPM, e.g. 2.50")
    signer.add_argument(
        "--ttl",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help=f"how long the signature is valid (default 300, at most {MAX_TTL:.0f})",
    )
    signer.add_argument(
        "--price-key",
        metavar="KEY",
        help="the middleware's price_key (default: $XSP_PRICE_KEY, which keeps it out of ps)",
    )
    signer.add_argument("--json", action="store_true", help="print the parameters as JSON")
    return parser


class _ArgumentParser(argparse.ArgumentParser):
    """argparse, but its errors are our one line with exit code 2."""

    def error(self, message: str) -> Any:
        raise UsageError(message)


# -- campaign ---------------------------------------------------------------------------------


def view_dict(view: CampaignView) -> dict[str, Any]:
    """A campaign as the CLI prints it; amounts are exact decimal strings."""
    c = view.config

    def money(units: int | None) -> str | None:
        return None if units is None else format_units(units)

    def instant(ms: int | None) -> str | None:
        return None if ms is None else format_instant(ms, c.timezone)

    return {
        "id": view.id,
        "budget": format_units(c.budget_units),
        "spent": format_units(view.spent_units),
        "remaining": format_units(view.remaining_units),
        "impressions": view.impressions,
        "caps": [str(cap) for cap in c.caps],
        "cpm": format_units(c.cost_units * 1000),
        "status": c.status,
        "daily_budget": money(c.daily_budget_units),
        "daily_spent": format_units(view.daily_spent_units),
        "timezone": c.timezone,
        "start": instant(c.start_ms),
        "end": instant(c.end_ms),
        "pacing": c.pacing,
        "pacing_target": money(view.pacing_target_units),
        "denied": dict(view.denials),
        "released": view.released,
        "leasing": c.leasing,
        "leased": format_units(view.leased_units),
        "max_cpm": money(None if c.max_cost_units is None else c.max_cost_units * 1000),
        "weight": c.weight,
        "pending": {"count": view.pending, "amount": format_units(view.pending_units)},
        "render_rate": None if view.render_rate is None else round(view.render_rate, 4),
    }


def _print_fields(data: dict[str, Any]) -> None:
    for key, value in data.items():
        if isinstance(value, list):
            value = ", ".join(value) or "-"
        elif isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        elif value is None:
            value = "-"
        print(f"{key:14}{value}")


async def campaign_set(args: argparse.Namespace, store: Store) -> int:
    view = await store.set_campaign(
        validate_campaign_id(args.id),
        budget=args.budget,
        daily_budget=args.daily_budget,
        cpm=args.cpm,
        caps=args.cap,
        timezone=args.timezone,
        start=args.start,
        end=args.end,
        pacing=args.pacing,
        leasing=args.leasing,
        max_cpm=args.max_cpm,
        weight=args.weight,
    )
    print(f"campaign {view.id} saved: " + json.dumps(view_dict(view)))
    return 0


async def _known(store: Store, campaign_id: str) -> CampaignView:
    view = await store.get_campaign(validate_campaign_id(campaign_id))
    if not view.recorded:
        raise UsageError(f"unknown campaign {campaign_id!r}: no config and no recorded state")
    return view


async def campaign_show(args: argparse.Namespace, store: Store) -> int:
    data = view_dict(await _known(store, args.id))
    if args.json:
        print(json.dumps(data))
    else:
        _print_fields(data)
    return 0


async def campaign_list(args: argparse.Namespace, store: Store) -> int:
    views = [await store.get_campaign(cid) for cid in await store.list_campaigns()]
    rows = [
        {
            "id": v.id,
            "status": v.status,
            "budget": format_units(v.budget_units),
            "spent": format_units(v.spent_units),
            "impressions": v.impressions,
            "pacing": v.config.pacing,
        }
        for v in views
    ]
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'id':<24}{'status':<11}{'budget':>16}{'spent':>16}{'impressions':>13}  pacing")
    for r in rows:
        print(
            f"{r['id']:<24}{r['status']:<11}{r['budget']:>16}{r['spent']:>16}"
            f"{r['impressions']:>13}  {r['pacing']}"
        )
    return 0


async def campaign_status(args: argparse.Namespace, store: Store, status: str) -> int:
    await _known(store, args.id)
    view = await store.set_campaign(args.id, status=status)
    print(f"campaign {view.id} is {view.status}")
    return 0


async def campaign_delete(args: argparse.Namespace, store: Store) -> int:
    await _known(store, args.id)
    await store.delete_campaign(args.id)
    print(f"campaign {args.id} deleted")
    return 0


# -- user -------------------------------------------------------------------------------------


def _when(ms: int | None) -> str | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC).isoformat()


async def user_show(args: argparse.Namespace, store: Store) -> int:
    if args.campaign is not None:
        validate_campaign_id(args.campaign)
    # Preference fields (``!o``, ``!b``) share the user's hash; they are no campaign's logs.
    windows = [
        (campaign, caps)
        for campaign, caps in await store.user_view(args.user_id, args.campaign)
        if not campaign.startswith("!")
    ]
    if args.json:
        print(
            json.dumps(
                {
                    campaign: [
                        {"cap": str(cap), "impressions": count, "frees_at": _when(frees)}
                        for cap, count, frees in caps
                    ]
                    for campaign, caps in windows
                }
            )
        )
        return 0
    if not windows:
        print("no impressions recorded for this user")
    for campaign, caps in windows:
        print("all campaigns" if campaign == "*" else campaign)
        for cap, count, frees in caps:
            until = f"  frees at {_when(frees)}" if frees is not None else ""
            print(f"  {cap!s:<14}{count:>5} of {cap.max_impressions}{until}")
    prefs = await get_preferences(store, args.user_id)
    if prefs.opted_out:
        print("opted out")
    if prefs.blocked_campaigns:
        print("blocked campaigns: " + ", ".join(prefs.blocked_campaigns))
    return 0


async def user_reset(args: argparse.Namespace, store: Store) -> int:
    if args.campaign is not None:
        validate_campaign_id(args.campaign)
    existed = await store.reset_user(args.user_id, args.campaign)
    scope = f" for campaign {args.campaign}" if args.campaign else ""
    print(f"user impressions reset{scope}" if existed else f"nothing recorded{scope}")
    return 0


async def user_opt(args: argparse.Namespace, store: Store, opted_out: bool) -> int:
    await set_opted_out(store, args.user_id, opted_out)
    print("user opted out" if opted_out else "user opted in")
    return 0


async def user_block(args: argparse.Namespace, store: Store, block: bool) -> int:
    campaign_id = validate_campaign_id(args.campaign_id)
    if block:
        await block_campaign(store, args.user_id, campaign_id)
    else:
        await unblock_campaign(store, args.user_id, campaign_id)
    print(f"campaign {campaign_id} {'blocked' if block else 'unblocked'} for this user")
    return 0


async def user_forget(args: argparse.Namespace, store: Store) -> int:
    existed = await forget_user(store, args.user_id)
    print("everything stored for this user was erased" if existed else "nothing stored")
    return 0


# -- doctor -----------------------------------------------------------------------------------


async def doctor(args: argparse.Namespace, store: Store) -> int:
    from .doctor import run_checks

    checks = await run_checks(store)
    if args.json:
        print(json.dumps([{"level": lvl, "check": name, "detail": d} for lvl, name, d in checks]))
    else:
        for level, name, detail in checks:
            print(f"{level.upper():<5} {name}: {detail}")
    return 1 if any(level == "fail" for level, _, _ in checks) else 0


def sign_price_command(args: argparse.Namespace) -> int:
    """``sign-price``: needs no store, only the key and the settings' parameter names."""
    overrides = {} if args.price_key is None else {"price_key": args.price_key}
    settings = Settings.from_env(**overrides)
    if settings.price_key is None:
        raise UsageError(
            "sign-price needs the price key the middleware verifies with: "
            "pass --price-key or set XSP_PRICE_KEY"
        )
    params = sign_price(
        args.campaign_id,
        args.cpm,
        secret_key=settings.price_key,
        ttl=args.ttl,
        campaign_param=settings.campaign_param,
        price_param=settings.price_param,
    )
    print(json.dumps(params) if args.json else urllib.parse.urlencode(params))
    return 0


async def demo(args: argparse.Namespace, store: Store) -> int:
    from .demo import run_demo

    return await run_demo(args, store)


COMMANDS: dict[tuple[str, str | None], Command] = {
    ("campaign", "set"): campaign_set,
    ("campaign", "show"): campaign_show,
    ("campaign", "list"): campaign_list,
    ("campaign", "pause"): lambda a, s: campaign_status(a, s, "paused"),
    ("campaign", "resume"): lambda a, s: campaign_status(a, s, "active"),
    ("campaign", "delete"): campaign_delete,
    ("user", "show"): user_show,
    ("user", "reset"): user_reset,
    ("user", "opt-out"): lambda a, s: user_opt(a, s, True),
    ("user", "opt-in"): lambda a, s: user_opt(a, s, False),
    ("user", "block"): lambda a, s: user_block(a, s, True),
    ("user", "unblock"): lambda a, s: user_block(a, s, False),
    ("user", "forget"): user_forget,
    ("doctor", None): doctor,
    ("demo", None): demo,
}


async def _run(command: Command, args: argparse.Namespace, store: Store) -> int:
    try:
        return await command(args, store)
    finally:
        await store.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        if args.command == "sign-price":
            return sign_price_command(args)
        overrides = {"redis_url": args.redis_url} if "redis_url" in args else {}
        settings = Settings.from_env(**overrides)
        if args.command == "dashboard":
            from .dashboard import serve_dashboard

            return serve_dashboard(settings, args.host, args.port)
        if args.command == "demo" and "redis_url" not in args:
            settings = settings.replace(redis_url=None)  # the demo's default is the embedded store
        store = Store(Rules.from_settings(settings))
        if store.is_memory and args.command not in ("demo", "doctor"):
            print(
                "warning: no XSP_REDIS_URL/--redis-url: using an embedded store that lives only "
                "as long as this command",
                file=sys.stderr,
            )
        command = COMMANDS[(args.command, getattr(args, "action", None))]
        return asyncio.run(_run(command, args, store))
    except (XSPError, ConfigError) as exc:
        print(f"xsp-middleware: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
