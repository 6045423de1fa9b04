"""The ``xsp-middleware`` command line: campaign administration on the shared store.

Reads ``XSP_REDIS_URL`` (and every other ``XSP_*`` setting); ``--redis-url`` overrides it.
Errors are one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from typing import Any

from .errors import XSPError
from .money import format_units
from .settings import Rules, Settings, validate_campaign_id
from .store import CampaignView, Store


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--redis-url",
        default=argparse.SUPPRESS,
        help="store URL (default: $XSP_REDIS_URL); redis://, rediss:// or unix://",
    )
    parser = argparse.ArgumentParser(
        prog="xsp-middleware",
        description="Administer xsp-middleware campaigns in the shared store.",
        parents=[common],
    )
    commands = parser.add_subparsers(dest="command", required=True)
    campaign = commands.add_parser("campaign", help="create, update and inspect campaigns")
    actions = campaign.add_subparsers(dest="action", required=True)

    set_ = actions.add_parser(
        "set", parents=[common], help="create or update a campaign (unset options keep values)"
    )
    set_.add_argument("id")
    set_.add_argument("--budget", metavar="D", help="lifetime budget, e.g. 500.00")
    set_.add_argument(
        "--cap",
        metavar="N/W",
        action="append",
        help="frequency cap such as 3/1h, 5/1d, 50/lifetime; repeat for several (replaces all)",
    )
    set_.add_argument("--cpm", metavar="D", help="default price when a request carries none")

    show = actions.add_parser("show", parents=[common], help="print a campaign and its spend")
    show.add_argument("id")
    show.add_argument("--json", action="store_true", help="print JSON")
    return parser


def view_dict(view: CampaignView) -> dict[str, Any]:
    """A campaign as the CLI prints it; amounts are exact decimal strings."""
    return {
        "id": view.id,
        "budget": format_units(view.budget_units),
        "spent": format_units(view.spent_units),
        "remaining": format_units(view.remaining_units),
        "impressions": view.impressions,
        "caps": [str(c) for c in view.caps],
        "cpm": format_units(view.cost_units * 1000),
        "status": view.status,
    }


async def _run(args: argparse.Namespace, store: Store) -> int:
    campaign_id = validate_campaign_id(args.id)
    try:
        if args.action == "set":
            await store.set_campaign(campaign_id, budget=args.budget, cpm=args.cpm, caps=args.cap)
            view = await store.get_campaign(campaign_id)
            print(f"campaign {campaign_id} saved: " + json.dumps(view_dict(view)))
            return 0
        view = await store.get_campaign(campaign_id)
        data = view_dict(view)
        if args.json:
            print(json.dumps(data))
        else:
            for key, value in data.items():
                print(f"{key:12} {', '.join(value) if isinstance(value, list) else value}")
        return 0
    finally:
        await store.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        overrides = {"redis_url": args.redis_url} if "redis_url" in args else {}
        settings = Settings.from_env(**overrides)
        store = Store(Rules.from_settings(settings))
        if store.is_memory:
            print(
                "warning: no XSP_REDIS_URL/--redis-url: using an embedded store that lives only "
                "as long as this command",
                file=sys.stderr,
            )
        return asyncio.run(_run(args, store))
    except XSPError as exc:
        print(f"xsp-middleware: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
