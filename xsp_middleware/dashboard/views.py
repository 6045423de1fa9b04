"""What a campaign's page shows, from its view and its history: the spend points against the
pacing curve, the denials by reason over the day, and a note on what the history covers."""

from __future__ import annotations

from collections.abc import Sequence

from ..store import CampaignView, Store, day_span
from . import pages
from .chart import Line, SpendChart, denials_chart, spend_chart
from .history import Sample

__all__ = ["campaign_charts"]

CURVE_POINTS = 48
"""The pacing curve is drawn through this many segments of the day (every half hour)."""


def campaign_charts(
    store: Store, view: CampaignView, samples: Sequence[Sample]
) -> tuple[list[str], str]:
    """The page's charts (HTML with inline SVG) and its note on the history. ``samples``: the
    campaign's history from the start of its local day."""
    c = view.config
    start, end = day_span(c.timezone, view.now_ms)
    samples = [s for s in samples if s.at_ms < min(end, view.now_ms)]
    # Each sample as the campaign's view then: the same arithmetic as `campaign show`.
    sampled = [store.campaign_view(view.id, c, s.state, s.at_ms) for s in samples]
    daily = c.daily_budget_units is not None

    def spend(v: CampaignView) -> int:
        return v.daily_spent_units if daily else v.spent_units

    points = [(v.now_ms, spend(v)) for v in sampled] + [(view.now_ms, spend(view))]
    ideal, upper = [], []
    for i in range(CURVE_POINTS + 1):
        at = start + (end - start) * i // CURVE_POINTS
        curve = store.pacing_curve(c, at, start, end)
        # Paced over the flight (no daily budget): its curve where the flight is.
        in_flight = daily or (c.start_ms or 0) <= at <= (c.end_ms or at)
        if curve is not None and in_flight:
            ideal.append((at, curve[0]))
            upper.append((at, curve[1]))
    paced = bool(ideal)
    what = "today's spend" if daily else "spend (lifetime)"
    title = f"{what} against the {'pacing curve' if paced else 'budget'}, {c.timezone} day"
    chart = spend_chart(
        SpendChart(
            start_ms=start,
            end_ms=end,
            tz=c.timezone,
            points=points,
            limit_units=c.daily_budget_units if daily else c.budget_units,
            limit_label="daily budget" if daily else "budget",
            ideal=ideal,
            upper=upper,
        ),
        title,
    )
    legend = (
        '<p class="legend-row"><span><i class="swatch spend"></i>spend (a dot per sample, '
        "the open one now)</span>"
        + (
            '<span><i class="swatch ideal"></i>ideal pacing</span><span><i class="swatch '
            'band"></i>burst allowance</span>'
            if paced
            else ""
        )
        + '<span><i class="swatch limit"></i>budget</span></p>'
    )
    seen = (*sampled, view)
    base = seen[0]
    lines = [
        Line(reason, [(v.now_ms, v.denials[reason] - base.denials[reason]) for v in seen])
        for reason in view.denials
        if any(v.denials[reason] for v in seen)
    ]
    denials = '<h2>Denials by reason today</h2><p class="note">No denials recorded.</p>'
    if lines:
        denials = "<h2>Denials by reason today</h2>" + denials_chart(
            lines, start, end, c.timezone, "denials by reason, since the first sample today"
        )
    note = pages.history_note(
        samples[0].at_ms if samples else None, start, c.timezone, len(samples)
    )
    return [f"<h2>{what.capitalize()}</h2>", chart, legend, denials], note
