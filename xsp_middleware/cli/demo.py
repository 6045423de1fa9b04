"""``xsp-middleware demo``: the example ad server under realistic traffic, then a report read
from what the store recorded.

It needs no Redis (the embedded store is the default) and finishes in seconds. ``--redis-url``
runs it on a real Redis (under the key prefix ``xsp-demo``), ``--serve`` serves the demo ad server
on 127.0.0.1:8000 instead, and ``--plot FILE.png`` charts an ``even`` campaign's spend against
its ideal pacing curve over a simulated day (a fake clock: it takes seconds, not a day).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import random
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from xml.sax.saxutils import escape

from ..clock import ManualClock
from ..errors import XSPError
from ..middleware import XSPMiddleware
from ..money import format_units
from ..settings import Campaign, Rules, Settings
from ..store import CampaignView, Store, cap_windows

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]

DEMO_PREFIX = "xsp-demo"
DEMO_SECRET = "xsp-demo-secret-key-not-for-production"
CAMPAIGNS = (
    # The tutorial's three campaigns...
    Campaign(id="campaign_premium", caps=["5/1d"], cpm="4.00"),
    Campaign(id="campaign_standard", caps=["3/1h"], cpm="2.00"),
    Campaign(id="campaign_budget", caps=["10/1h"], cpm="1.00", budget="1.50"),
    # ...and one paced evenly over the day, so pacing shows too.
    Campaign(id="campaign_even", caps=["3/1h"], cpm="2.00", daily_budget="3.00", pacing="even"),
)
WEIGHTS = (0.3, 0.35, 0.2, 0.15)
CONCURRENCY = 64

# The order of the InLine's children is the VAST 4.2 schema's (a sequence): AdSystem,
# Impression, Pricing, AdServingId, AdTitle, Creatives. AdServingId and each Creative's
# UniversalAdId are required since VAST 4.1.
VAST = """<?xml version="1.0" encoding="UTF-8"?>
<VAST version="4.2" xmlns="http://www.iab.com/VAST">
  <Ad id="{campaign}">
    <InLine>
      <AdSystem version="1.0">xsp-middleware</AdSystem>
      <Impression id="imp"><![CDATA[{impression}]]></Impression>
      <Pricing model="CPM" currency="USD"><![CDATA[{cpm}]]></Pricing>
      <AdServingId>{serving_id}</AdServingId>
      <AdTitle>Campaign {campaign}</AdTitle>
      <Creatives>
        <Creative id="{campaign}-video" sequence="1">
          <UniversalAdId idRegistry="unknown">unknown</UniversalAdId>
          <Linear>
            <Duration>00:00:15</Duration>
            <MediaFiles>
              <MediaFile delivery="progressive" type="video/mp4" width="640" height="360">
                <![CDATA[https://cdn.example.com/{campaign}.mp4]]>
              </MediaFile>
            </MediaFiles>
          </Linear>
        </Creative>
      </Creatives>
    </InLine>
  </Ad>
</VAST>
"""


def vast_xml(campaign_id: str, cpm: object, impression_url: str | None = None) -> str:
    """A small VAST 4.2 document for a campaign (the example ad server's response): one InLine
    ad with one linear creative.

    ``impression_url`` is the ad's one ``<Impression>``: pass ``Decision.impression_url``, so
    that with ``record_on="beacon"`` the impression counts when the player fetches it. Without
    it, the ``<Impression>`` is a placeholder that counts nothing.

    >>> "<![CDATA[https://ads.example.com/xsp/impression?t=abc]]>" in vast_xml(
    ...     "c1", "2.50", "https://ads.example.com/xsp/impression?t=abc")
    True
    """
    if impression_url is None:
        impression = f"https://ads.example.com/imp?c={campaign_id}"
        serving_id = f"xsp-{campaign_id}"
    else:
        impression = impression_url
        # Unique per served ad, as VAST asks, because the impression URL's token is.
        serving_id = "xsp-" + hashlib.sha256(impression_url.encode()).hexdigest()[:32]
    return VAST.format(
        campaign=escape(campaign_id),
        cpm=_cdata(str(cpm)),
        impression=_cdata(impression),
        serving_id=escape(serving_id),
    )


def _cdata(text: str) -> str:
    """``text`` safe inside a CDATA section: a ``]]>`` in it would end the section early."""
    return text.replace("]]>", "]]]]><![CDATA[>")


async def vast_app(
    scope: Scope,
    receive: Callable[[], Awaitable[Message]],
    send: Callable[[Message], Awaitable[None]],
) -> None:
    """The example ad server as a bare ASGI app: ``GET /ad`` answers the VAST document of the
    campaign XSPMiddleware reserved."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    decision = scope.get("state", {}).get("xsp")
    if scope["type"] != "http" or scope["path"] != "/ad" or decision is None:
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b"not found"})
        return
    impression_url = getattr(decision, "impression_url", None)
    body = vast_xml(decision.campaign_id, decision.cpm, impression_url).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/xml"),
                (b"content-length", b"%d" % len(body)),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def demo_middleware(redis_url: str | None) -> XSPMiddleware:
    return XSPMiddleware(
        vast_app,
        redis_url=redis_url or f"memory://{DEMO_PREFIX}",
        key_prefix=DEMO_PREFIX,
        secret_key=DEMO_SECRET,
        campaigns=list(CAMPAIGNS),
        paths=["/ad"],
    )


async def run_demo(args: argparse.Namespace, store: Store) -> int:
    redis_url = None if store.is_memory else store.url
    app = demo_middleware(redis_url)
    await _forget_previous_demo(app.store)
    if args.serve:
        return await _serve(app, args.port)
    if args.plot:
        return await plot_pacing(app.store.rules, args.plot)
    await _traffic(app, max(1, args.users))
    return await report(app.store)


async def _forget_previous_demo(store: Store) -> None:
    client = store.client
    keys = [key async for key in client.scan_iter(match=f"{DEMO_PREFIX}:*", count=1000)]
    for start in range(0, len(keys), 500):
        await client.delete(*keys[start : start + 500])


async def _traffic(app: XSPMiddleware, users: int) -> None:
    from rich.progress import Progress

    rng = random.Random(7)
    total = users * 5
    # Heavy users come back often (a Pareto tail), which is what makes caps bite.
    population = [f"user-{i}" for i in range(users)]
    weights = [1 / (i + 1) ** 0.6 for i in range(users)]
    plan = list(
        zip(
            rng.choices(population, weights, k=total),
            rng.choices([c.id for c in CAMPAIGNS], WEIGHTS, k=total),
            strict=True,
        )
    )
    queue = iter(plan)
    with Progress(transient=True) as progress:
        task = progress.add_task(f"{total} ad requests from {users} users", total=total)

        async def worker() -> None:
            for user, campaign in queue:
                await _request(app, user, campaign)
                progress.advance(task)

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))


async def _request(app: XSPMiddleware, user: str, campaign: str) -> int:
    status = 0
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/ad",
        "raw_path": b"/ad",
        "root_path": "",
        "query_string": f"campaign_id={campaign}".encode(),
        "headers": [(b"host", b"demo"), (b"cookie", f"user_id={user}".encode())],
    }

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


async def report(store: Store) -> int:
    """The per-campaign table, computed from what the store recorded."""
    from rich.console import Console
    from rich.table import Table

    views = {c.id: await store.get_campaign(c.id) for c in CAMPAIGNS}
    highest = await _highest_per_user(store, views)
    table = Table(title="xsp-middleware demo: what the store recorded")
    for column in (
        "campaign",
        "requests",
        "served",
        "frequency-capped",
        "budget-denied",
        "paced",
        "spend / budget",
        "most one user got (cap)",
    ):
        table.add_column(column, justify="left" if column == "campaign" else "right")
    problems: list[str] = []
    for cid, view in views.items():
        denied = view.denials
        requests = view.impressions + sum(denied.values()) + view.released
        budget = view.config.daily_budget_units or view.budget_units
        spent = view.daily_spent_units if view.config.daily_budget_units else view.spent_units
        caps = " ".join(f"{highest[cid].get(str(cap), 0)} ({cap})" for cap in view.caps)
        table.add_row(
            cid,
            str(requests),
            str(view.impressions),
            str(denied["frequency_capped"]),
            str(denied["budget_exhausted"]),
            str(denied["paced"]),
            f"{format_units(spent)} / {format_units(budget)}",
            caps,
        )
        problems += _violations(view, highest[cid])
    Console(width=max(Console().width, 132)).print(table)
    if problems:
        print("NOT EXACT: " + "; ".join(problems))
        return 1
    print("Every cap and every budget held exactly (spend = impressions x price, to the unit).")
    return 0


def _violations(view: CampaignView, highest: dict[str, int]) -> list[str]:
    found = []
    if view.spent_units > view.budget_units:
        found.append(f"{view.id} overspent its budget")
    daily = view.config.daily_budget_units
    if daily is not None and view.daily_spent_units > daily:
        found.append(f"{view.id} overspent its daily budget")
    if view.spent_units != view.impressions * view.cost_units:
        found.append(f"{view.id} spend {view.spent_units} != impressions x price")
    for cap in view.caps:
        if highest.get(str(cap), 0) > cap.max_impressions:
            found.append(f"{view.id}: a user got {highest[str(cap)]} under cap {cap}")
    return found


async def _highest_per_user(
    store: Store, views: dict[str, CampaignView]
) -> dict[str, dict[str, int]]:
    """The most impressions any one user has in each cap's current window, from the user logs."""
    client = store.client
    highest: dict[str, dict[str, int]] = {cid: {} for cid in views}
    keys = [key async for key in client.scan_iter(match=f"{DEMO_PREFIX}:u:*", count=1000)]
    for start in range(0, len(keys), 500):
        async with client.pipeline(transaction=False) as pipe:
            for key in keys[start : start + 500]:
                pipe.hgetall(key)
            logs = await pipe.execute()
        for log in logs:
            for raw_field, raw in log.items():
                field = raw_field.decode() if isinstance(raw_field, bytes) else raw_field
                view = views.get(field)
                if view is None:
                    continue
                text = raw.decode() if isinstance(raw, bytes) else raw
                for cap, count, _ in cap_windows(
                    view.caps, text, view.now_ms, view.config.timezone
                ):
                    best = highest[field]
                    best[str(cap)] = max(best.get(str(cap), 0), count)
    return highest


async def _serve(app: XSPMiddleware, port: int = 8000) -> int:
    try:
        import uvicorn
    except ImportError:
        raise XSPError("--serve needs uvicorn: pip install 'xsp-middleware[examples]'") from None
    from ..dashboard import dashboard_app, with_dashboard

    # The dashboard reads the demo's own store; XSP_DASHBOARD_TOKEN turns its actions on.
    settings = app.settings.replace(dashboard_token=Settings.from_env().dashboard_token)
    both = with_dashboard(app, dashboard_app(settings))
    base = f"http://127.0.0.1:{port}"
    print(f"Serving the demo ad server on {base} (Ctrl-C to stop). Try:")
    for c in CAMPAIGNS:
        print(f"  curl -i -b user_id=alice '{base}/ad?campaign_id={c.id}'")
    print(f"  curl -i '{base}/ad?campaign_id=campaign_standard&cpm=2.123456'  # 400")
    print(f"The dashboard of its campaigns: {base}/dashboard/")
    server = uvicorn.Server(uvicorn.Config(both, host="127.0.0.1", port=port, log_level="info"))
    await server.serve()
    return 0


async def plot_pacing(rules: Rules, path: str) -> int:
    """A simulated day of uniform traffic (twice what the budget buys) on an even campaign,
    driven by a fake clock; spend is charted against the ideal linear curve."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise XSPError("--plot needs matplotlib: pip install 'xsp-middleware[plot]'") from None
    store = Store(rules)
    campaign = "campaign_even_plot"
    await store.set_campaign(
        campaign, daily_budget="10.00", budget="1000.00", cpm="2.00", caps=[], pacing="even"
    )
    day_start = 1_798_761_600_000  # 2027-01-01T00:00:00Z, a UTC midnight
    minutes, per_minute = 24 * 60, 7  # 10080 requests; the budget buys 5000
    clock = store.clock = ManualClock(day_start)
    hours, spend = [], []
    rule = rules.rule_for(campaign)
    for minute in range(minutes):
        clock.now = day_start + minute * 60_000 + 30_000
        for i in range(per_minute):
            await store.reserve(campaign, store.user_key(f"p{minute}-{i}"), None, rule)
        view = await store.get_campaign(campaign)
        hours.append((minute + 1) / 60)
        spend.append(view.daily_spent_units / 10**7)
    figure, axis = plt.subplots(figsize=(8, 4.5))
    axis.plot(hours, spend, label="spend (even pacing)")
    axis.plot([0, 24], [0, 10], "--", label="ideal linear curve")
    axis.plot([0, 24], [0.5, 10.5], ":", label="ceiling: ideal + 5% burst")
    axis.set_xlabel("hour of the simulated day")
    axis.set_ylabel("spend (currency units)")
    axis.set_title("campaign_even_plot: daily budget 10.00, uniform traffic at 2x the budget")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    print(f"wrote {path}: spend ended the day at {spend[-1]:.4f} of 10.00")
    return 0
