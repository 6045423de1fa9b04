"""The dashboard's pages as HTML: the campaigns, one campaign, the login form, an error. Every
value is escaped here; the shell is ``templates/page.html`` and the style ``static/
dashboard.css``, both shipped in the package. No page needs JavaScript."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from html import escape
from importlib import resources
from string import Template
from urllib.parse import quote, urlencode
from zoneinfo import ZoneInfo

from ..clock import format_instant
from ..money import format_units
from ..store import CampaignView

__all__ = [
    "COLUMNS",
    "STATUSES",
    "Page",
    "Row",
    "campaign_page",
    "campaigns_page",
    "error_page",
    "login_page",
]

_FILES = resources.files("xsp_middleware.dashboard")
_SHELL = Template((_FILES / "templates" / "page.html").read_text(encoding="utf-8"))
STATUSES = ("active", "paused", "exhausted")
COLUMNS = {
    "id": "Campaign",
    "status": "Status",
    "spent": "Spent / budget",
    "today": "Today / pacing target",
    "impressions": "Impressions",
    "render": "Render rate",
    "denials": "Denials",
}
"""The campaigns table's columns, by their ``sort`` name."""


@dataclass(frozen=True, slots=True)
class Page:
    """What every page shares: where the dashboard is mounted, the store it reads, whether
    actions are on (a token is set) and the visitor is signed in."""

    root: str
    store: str
    token_set: bool
    signed_in: bool = False


def _shell(page: Page, title: str, main: str, banner: str = "") -> str:
    if not page.token_set:
        banner = (
            '<p class="banner readonly">Read-only: no <code>dashboard_token</code> is set '
            "(<code>XSP_DASHBOARD_TOKEN</code>), so this dashboard answers only on this "
            "machine and changes nothing.</p>" + banner
        )
    session = ""
    if page.token_set and page.signed_in:
        session = (
            f'<form method="post" action="{escape(page.root)}/logout">'
            "<button>Sign out</button></form>"
        )
    return _SHELL.substitute(
        title=escape(title),
        root=escape(page.root),
        store=escape(page.store),
        session=session,
        banner=banner,
        main=main,
    )


def _status(status: str) -> str:
    kind = status if status in STATUSES else "other"
    return f'<span class="status {kind}">{escape(status)}</span>'


def _denials(denials: Mapping[str, int]) -> str:
    shown = [f"{escape(reason)} {count}" for reason, count in denials.items() if count]
    return ", ".join(shown) or "none"


def _rate(view: CampaignView) -> str:
    rate = view.render_rate
    if rate is None:
        return '<span class="note">no beacons</span>'
    return f"{rate:.1%} ({view.beacons_confirmed} of {view.beacons_served})"


@dataclass(frozen=True, slots=True)
class Row:
    """One campaign of the list, with what it sorts by."""

    view: CampaignView
    today_units: int | None
    """Today's spend against pacing: the local day's (a daily budget) or the flight's."""
    target_units: int | None

    def key(self, column: str) -> tuple[int, object]:
        view = self.view
        value: object = {
            "id": view.id,
            "status": view.status,
            "spent": view.spent_units,
            "today": self.today_units,
            "impressions": view.impressions,
            "render": view.render_rate,
            "denials": sum(view.denials.values()),
        }[column]
        return (0, value) if value is not None else (1, 0)  # unknown values sort last


def _today_cell(row: Row) -> str:
    if row.today_units is None:
        return '<span class="note">no daily budget or pacing</span>'
    shown = format_units(row.today_units)
    if row.target_units is None:
        return escape(shown)
    share = f" ({row.today_units / row.target_units:.0%})" if row.target_units else ""
    return f"{escape(shown)} / {escape(format_units(row.target_units))}{share}"


def campaigns_page(
    page: Page, rows: Sequence[Row], sort: str, desc: bool, status: str, unreadable: int = 0
) -> str:
    """The campaigns, sorted by ``sort`` (a COLUMNS key), filtered by ``status`` ('' all).
    ``unreadable``: how many could not be read (a hand-edited hash), left out."""
    root = escape(page.root)

    def link(column: str) -> str:
        flip = column == sort and not desc
        query = {"sort": column, "order": "desc" if flip else "asc"}
        if status:
            query["status"] = status
        mark = (" ▼" if desc else " ▲") if column == sort else ""
        cls = ' class="sorted"' if column == sort else ""
        return (
            f'<a{cls} href="{root}/?{escape(urlencode(query))}">{escape(COLUMNS[column])}{mark}</a>'
        )

    options = "".join(
        f'<option value="{s}"{" selected" if s == status else ""}>{s or "every status"}</option>'
        for s in ("", *STATUSES)
    )
    head = "".join(
        f"<th{' class=num' if c in ('spent', 'today', 'impressions') else ''} "
        f'aria-sort="{("descending" if desc else "ascending") if c == sort else "none"}">'
        f"{link(c)}</th>"
        for c in COLUMNS
    )
    body = []
    for row in rows:
        v = row.view
        body.append(
            "<tr>"
            f'<td><a href="{root}/campaigns/{quote(v.id)}">{escape(v.id)}</a></td>'
            f"<td>{_status(v.status)}</td>"
            f'<td class="num">{escape(format_units(v.spent_units))} / '
            f"{escape(format_units(v.budget_units))}</td>"
            f'<td class="num">{_today_cell(row)}</td>'
            f'<td class="num">{v.impressions}</td>'
            f"<td>{_rate(v)}</td>"
            f'<td class="denials">{_denials(v.denials)}</td>'
            "</tr>"
        )
    if not body:
        empty = "no campaign has this status" if status else "no campaigns yet"
        body.append(f'<tr><td colspan="{len(COLUMNS)}" class="note">{empty}</td></tr>')
    main = (
        "<h1>Campaigns</h1>"
        f'<form class="filter" method="get" action="{root}/">'
        f'<input type="hidden" name="sort" value="{escape(sort)}">'
        f'<input type="hidden" name="order" value="{"desc" if desc else "asc"}">'
        f'<label for="status">Status</label><select id="status" name="status">{options}</select>'
        "<button>Filter</button></form>"
        f'<table class="campaigns"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )
    if unreadable:
        main += (
            f'<p class="error">{unreadable} campaign(s) could not be read: the store holds '
            "values the dashboard cannot parse (logged).</p>"
        )
    return _shell(page, "Campaigns", main)


def _when(ms: int | None, tz: str) -> str:
    return "not set" if ms is None else escape(format_instant(ms, tz))


def campaign_page(
    page: Page,
    view: CampaignView,
    charts: Sequence[str],
    history_note: str,
    *,
    done: str = "",
    error: tuple[str, str, str] | None = None,
) -> str:
    """One campaign: its spend chart against pacing, denials over the day, its settings, and
    (signed in) its actions. ``error``: (field, value given, message) of a refused action."""
    c = view.config
    root, cid = escape(page.root), escape(view.id)
    facts = [
        ("Status", _status(view.status)),
        (
            "Spent",
            f"{escape(format_units(view.spent_units))} of "
            f"{escape(format_units(view.budget_units))} "
            f"({escape(format_units(view.remaining_units))} left)",
        ),
        (
            "Daily budget",
            "none"
            if c.daily_budget_units is None
            else f"{escape(format_units(view.daily_spent_units))} of "
            f"{escape(format_units(c.daily_budget_units))} today",
        ),
        (
            "Pacing",
            escape(c.pacing)
            + (
                ""
                if view.pacing_target_units is None
                else f", target now {escape(format_units(view.pacing_target_units))}"
            ),
        ),
        ("Price (CPM)", escape(format_units(c.cost_units * 1000))),
        ("Caps", escape(", ".join(str(cap) for cap in c.caps)) or "none"),
        (
            "Flight",
            "none (always on)"
            if c.start_ms is None and c.end_ms is None
            else f"{_when(c.start_ms, c.timezone)} to {_when(c.end_ms, c.timezone)}",
        ),
        ("Time zone", escape(c.timezone)),
        ("Impressions", str(view.impressions)),
        ("Render rate", _rate(view)),
        ("Pending", f"{view.pending} ({escape(format_units(view.pending_units))})"),
        ("Denials", _denials(view.denials)),
    ]
    facts_html = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts)
    # After an action, what holds now (a link to ?done=... alone changes nothing, and says
    # nothing untrue).
    said = {
        "paused": "Paused: every process's next decision denies it (campaign_paused)."
        if view.status == "paused"
        else "",
        "resumed": "Active: every process's next decision may serve it."
        if view.status == "active"
        else "",
        "budget": f"Lifetime budget: {format_units(view.budget_units)}. Every process's next "
        "decision uses it.",
        "daily_budget": "Daily budget: "
        + ("none" if c.daily_budget_units is None else format_units(c.daily_budget_units))
        + ". Every process's next decision uses it.",
    }.get(done, "")
    banner = f'<p class="banner done" role="status">{escape(said)}</p>' if said else ""
    if error is not None:
        banner = f'<p class="banner error" role="alert">Nothing changed: {escape(error[2])}</p>'
    actions = _actions(page, view, error)
    main = (
        f"<h1>{cid} {_status(view.status)}</h1>"
        f'<div class="panels"><section>{"".join(charts)}'
        f'<p class="note history">{escape(history_note)}</p></section>'
        f'<section><h2>Settings and state</h2><dl class="facts">{facts_html}</dl>'
        f"{actions}</section></div>"
        f'<p><a href="{root}/">All campaigns</a></p>'
    )
    return _shell(page, view.id, main, banner)


def _actions(page: Page, view: CampaignView, error: tuple[str, str, str] | None) -> str:
    if not page.token_set:
        return ""  # read-only: no actions at all
    if not page.signed_in:
        return (
            f'<p class="note"><a href="{escape(page.root)}/login">Sign in</a> to pause, '
            "resume or change budgets.</p>"
        )
    url = f"{escape(page.root)}/campaigns/{quote(view.id)}"
    paused = view.status == "paused"
    toggle = (
        f'<form method="post" action="{url}"><input type="hidden" name="action" '
        f'value="{"resume" if paused else "pause"}"><button'
        f"{'' if paused else ' class=danger'}>{'Resume' if paused else 'Pause'}</button></form>"
    )
    forms = [toggle]
    for name, label, current in (
        ("budget", "Lifetime budget", format_units(view.budget_units)),
        (
            "daily_budget",
            "Daily budget",
            ""
            if view.config.daily_budget_units is None
            else format_units(view.config.daily_budget_units),
        ),
    ):
        value, message = current, ""
        invalid = error is not None and error[0] == name
        if invalid and error is not None:
            value = error[1]
            message = f'<p class="error" id="{name}-error">{escape(error[2])}</p>'
        described = f' aria-invalid="true" aria-describedby="{name}-error"' if invalid else ""
        forms.append(
            f'<form method="post" action="{url}"><input type="hidden" name="action" '
            f'value="{name}"><label for="{name}">{label}</label><input type="text" '
            f'id="{name}" name="value" value="{escape(value)}" inputmode="decimal" '
            f'autocomplete="off"{described}> <button>Save</button>{message}</form>'
        )
    return f'<h2>Actions</h2><div class="actions">{"".join(forms)}</div>'


def login_page(page: Page, next_path: str, error: str = "") -> str:
    alert = f'<p class="error" role="alert">{escape(error)}</p>' if error else ""
    main = (
        '<div class="login"><h1>Sign in</h1>'
        "<p>This dashboard shows what campaigns spend and changes their budgets: sign in "
        "with its token (<code>XSP_DASHBOARD_TOKEN</code>).</p>"
        f'{alert}<form method="post" action="{escape(page.root)}/login">'
        f'<input type="hidden" name="next" value="{escape(next_path)}">'
        '<label for="token">Dashboard token</label>'
        '<input type="password" id="token" name="token" autocomplete="current-password" '
        "required autofocus><button>Sign in</button></form></div>"
    )
    return _shell(page, "Sign in", main)


def error_page(page: Page, title: str, detail: str) -> str:
    main = (
        f"<h1>{escape(title)}</h1><p>{escape(detail)}</p>"
        f'<p><a href="{escape(page.root)}/">All campaigns</a></p>'
    )
    return _shell(page, title, main)


def history_note(first_ms: int | None, day_start: int, tz: str, count: int) -> str:
    """What the chart's history covers, in words (a dashboard started late says so)."""
    if first_ms is None:
        return (
            "No history yet today: the dashboard samples the store once a minute while it runs. "
            "The chart shows the spend now."
        )
    first = datetime.fromtimestamp(first_ms / 1000, ZoneInfo(tz)).strftime("%H:%M")
    if first_ms - day_start < 120_000:
        return f"History since {first} ({count} samples)."
    return (
        f"History since {first} only: the dashboard was not sampling earlier today "
        f"({count} samples). Earlier spend is in the totals, not in the chart."
    )
