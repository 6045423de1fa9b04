"""The middleware reads the campaign and the price exactly as Starlette's query_params do."""

from __future__ import annotations

from urllib.parse import parse_qsl

from hypothesis import given, settings
from hypothesis import strategies as st

from xsp_middleware.middleware import query_values

PIECES = st.sampled_from(
    [
        "campaign_id",
        "cpm",
        "campaign%5Fid",
        "c%70m",
        "=",
        "&",
        "+",
        "%",
        "%2",
        "%zz",
        "%C3%A9",
        "%ff",
        "a",
        "1.5",
        " ",
        ";",
        "campaign_id+",
        "\u00e9",
        "",
    ]
)


@settings(max_examples=2000, deadline=None)
@given(st.lists(PIECES, max_size=12).map("".join))
def test_query_values_agree_with_parse_qsl(query: str) -> None:
    raw = query.encode("latin-1", "replace")
    expected = parse_qsl(raw.decode("latin-1"), keep_blank_values=True)
    campaigns, prices = query_values(raw, "campaign_id", "cpm")
    assert campaigns == {v for k, v in expected if k == "campaign_id"}
    assert prices == {v for k, v in expected if k == "cpm"}


def test_only_the_two_names_are_read() -> None:
    assert query_values(b"x=1&campaign_id=c1&cpm=2&campaign_id=c1", "campaign_id", "cpm") == (
        {"c1"},
        {"2"},
    )
    assert query_values(b"campaign_id", "campaign_id", "cpm") == ({""}, set())
