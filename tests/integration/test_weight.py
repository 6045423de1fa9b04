"""A campaign's ``weight`` (its relative chance under ``selection="weighted"``), driven as a user
would: the installed ``xsp-middleware`` console script on a throwaway Redis, ``Campaign(...)``
in settings, ``XSP_CAMPAIGNS`` and Django's ``XSP_MIDDLEWARE``, and the admin API."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest
import redis
from conftest import as_user, client
from processes import cli, show

from xsp_middleware import Campaign, Settings
from xsp_middleware.errors import ConfigError
from xsp_middleware.settings import Rules, defaults
from xsp_middleware.store import Store

BAD_WEIGHTS = ("0", "-1", "1.5", "abc", "2000000", "1000001", "", " 3", "1e3", "\uff13", "9" * 5000)


def set_campaign(redis_url: str, campaign: str, *options: str, **env: str) -> dict[str, Any]:
    """``campaign set ID ...``: what it printed it saved."""
    result = cli("campaign", "set", campaign, *options, redis_url=redis_url, **env)
    assert result.returncode == 0, result.stderr
    prefix = f"campaign {campaign} saved: "
    assert result.stdout.startswith(prefix), result.stdout
    saved: dict[str, Any] = json.loads(result.stdout.removeprefix(prefix))
    return saved


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The CLI's failure: exit code 2, nothing on stdout, one line on stderr, no traceback."""
    assert result.returncode == 2, result
    assert result.stdout == ""
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def stored_config(redis_url: str, campaign: str) -> dict[str, str]:
    """The campaign's config hash as Redis holds it (the default key prefix ``xsp``)."""
    with redis.Redis.from_url(redis_url, decode_responses=True) as r:
        stored: dict[str, str] = r.hgetall(f"xsp:c:{{{campaign}}}:cfg")
    return stored


# -- the CLI ----------------------------------------------------------------------------------


def test_weight_defaults_to_1_and_campaign_set_weight_stores_it(redis_url: str) -> None:
    assert set_campaign(redis_url, "c1", "--budget", "10.00")["weight"] == 1
    assert show(redis_url, "c1")["weight"] == 1
    assert "weight" not in stored_config(redis_url, "c1")  # nothing given, nothing stored

    assert set_campaign(redis_url, "c1", "--weight", "3")["weight"] == 3
    assert show(redis_url, "c1")["weight"] == 3
    assert stored_config(redis_url, "c1")["weight"] == "3"
    text = cli("campaign", "show", "c1", redis_url=redis_url).stdout
    assert "weight        3" in text.splitlines()

    # Other options leave the weight alone, and --weight leaves the others alone.
    assert set_campaign(redis_url, "c1", "--budget", "20.00", "--cpm", "4.00")["weight"] == 3
    saved = set_campaign(redis_url, "c1", "--weight", "1000000")
    assert (saved["weight"], saved["budget"], saved["cpm"]) == (1_000_000, "20.00", "4.00")
    assert set_campaign(redis_url, "c1", "--weight", "1")["weight"] == 1
    assert stored_config(redis_url, "c1")["weight"] == "1"


def test_a_bad_weight_exits_2_with_one_line_and_changes_nothing(redis_url: str) -> None:
    set_campaign(redis_url, "c1", "--weight", "7", "--budget", "10.00")
    before = show(redis_url, "c1")
    for bad in BAD_WEIGHTS:
        line = one_error_line(cli("campaign", "set", "c1", "--weight", bad, redis_url=redis_url))
        assert line.startswith(
            "xsp-middleware: error: weight: must be a whole number from 1 to 1000000, not "
        ), (bad, line)
        assert repr(bad)[:40] in line
        # With other options in the same call: none of them is written either.
        result = cli(
            "campaign", "set", "c1", "--budget", "99.00", "--weight", bad, redis_url=redis_url
        )
        assert one_error_line(result).startswith("xsp-middleware: error: weight: ")
    assert show(redis_url, "c1") == before
    assert stored_config(redis_url, "c1")["weight"] == "7"

    # A campaign that does not exist yet is not created by a refused weight.
    one_error_line(cli("campaign", "set", "c2", "--weight", "0", redis_url=redis_url))
    line = one_error_line(cli("campaign", "show", "c2", redis_url=redis_url))
    assert "unknown campaign 'c2'" in line
    assert stored_config(redis_url, "c2") == {}


def test_the_stored_weight_wins_over_xsp_campaigns(redis_url: str) -> None:
    campaigns = json.dumps([{"id": "c1", "weight": 5, "budget": "50.00"}])
    assert show_env(redis_url, "c1", XSP_CAMPAIGNS=campaigns)["weight"] == 5  # from settings
    assert set_campaign(redis_url, "c1", "--weight", "2", XSP_CAMPAIGNS=campaigns)["weight"] == 2
    assert show_env(redis_url, "c1", XSP_CAMPAIGNS=campaigns)["weight"] == 2  # the store wins
    assert show(redis_url, "c1")["weight"] == 2  # also where the settings name no c1

    # A hand-edited hash that holds no valid weight: the settings' value applies.
    with redis.Redis.from_url(redis_url) as r:
        for junk in ("abc", "0", "1000001", "", "-3"):
            r.hset("xsp:c:{c1}:cfg", "weight", junk)
            assert show_env(redis_url, "c1", XSP_CAMPAIGNS=campaigns)["weight"] == 5, junk
            assert show(redis_url, "c1")["weight"] == 1, junk


def show_env(redis_url: str, campaign: str, **env: str) -> dict[str, Any]:
    result = cli("campaign", "show", campaign, "--json", redis_url=redis_url, **env)
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


@pytest.mark.parametrize("bad", [0, -1, 1.5, "3", True, 2_000_000, [3]])
def test_a_bad_weight_in_xsp_campaigns_stops_the_cli_with_a_clear_error(
    redis_url: str, bad: object
) -> None:
    campaigns = json.dumps([{"id": "c1", "weight": bad}])
    result = cli("campaign", "show", "c1", redis_url=redis_url, XSP_CAMPAIGNS=campaigns)
    line = one_error_line(result)
    assert line.startswith(
        "xsp-middleware: error: XSP_CAMPAIGNS: campaign c1 weight: "
        "must be a whole number from 1 to 1000000, not "
    ), line


async def test_a_weighted_campaign_serves_as_before(redis_url: str, make_app: Any) -> None:
    """The scripts read the campaign's config hash whole: a stored weight must not disturb
    them (caps, budget and price apply as ever)."""
    set_campaign(redis_url, "c1", "--weight", "9", "--cap", "1/1h", "--budget", "0.004")
    app = make_app(redis_url=redis_url)
    async with client(app) as c:
        first = await c.get("/ad?campaign_id=c1&cpm=2.00", headers=as_user("u1"))
        again = await c.get("/ad?campaign_id=c1&cpm=2.00", headers=as_user("u1"))
        other = await c.get("/ad?campaign_id=c1&cpm=2.00", headers=as_user("u2"))
        broke = await c.get("/ad?campaign_id=c1&cpm=2.00", headers=as_user("u3"))
    await app.store.aclose()
    assert first.status_code == 200 and other.status_code == 200
    assert again.headers["x-xsp-decision"] == "frequency_capped"
    assert broke.headers["x-xsp-decision"] == "budget_exhausted"
    data = show(redis_url, "c1")
    assert (data["weight"], data["impressions"], data["spent"]) == (9, 2, "0.004")


# -- Campaign(weight=...), XSP_CAMPAIGNS and Django --------------------------------------------


@pytest.mark.parametrize(
    ("weight", "effective"), [(None, 1), (1, 1), (3, 3), (1_000_000, 1_000_000)]
)
def test_campaign_weight(weight: int | None, effective: int) -> None:
    settings = Settings(campaigns=[Campaign(id="c1", weight=weight)])
    rule = Rules.from_settings(settings).rule_for("c1")
    assert rule.weight == effective
    assert rule.fields()["weight"] == str(effective)
    # The scripts' arguments do not change: the weight is no part of them.
    assert rule.wire == defaults().wire
    assert len(rule.wire) == 9
    assert Rules.from_settings(settings).rule_for("elsewhere").weight == 1


@pytest.mark.parametrize("bad", [0, -1, 1.5, 2.0, "3", True, False, 1_000_001, 10**100, [1]])
def test_a_bad_campaign_weight_is_a_config_error_naming_the_campaign(bad: Any) -> None:
    with pytest.raises(ConfigError) as caught:
        Campaign(id="c1", weight=bad)
    message = str(caught.value)
    assert message.startswith("campaign c1 weight: must be a whole number from 1 to 1000000, not ")
    assert message.endswith(repr(bad)[:40])


def test_xsp_campaigns_takes_a_weight() -> None:
    campaigns = '[{"id": "c1", "weight": 3}, {"id": "c2", "weight": null}, {"id": "c3"}]'
    settings = Settings.from_env({"XSP_CAMPAIGNS": campaigns})
    assert list(settings.campaigns) == [Campaign("c1", weight=3), Campaign("c2"), Campaign("c3")]
    rules = Rules.from_settings(settings)
    assert [rules.rule_for(c).weight for c in ("c1", "c2", "c3")] == [3, 1, 1]


@pytest.mark.parametrize("bad", ["0", "-2", "1.5", "3.0", '"3"', "true", "1000001", "[3]"])
def test_a_bad_weight_in_xsp_campaigns_is_a_config_error(bad: str) -> None:
    env = {"XSP_CAMPAIGNS": f'[{{"id": "c1", "weight": {bad}}}]'}
    with pytest.raises(
        ConfigError, match=r"^XSP_CAMPAIGNS: campaign c1 weight: must be a whole number from 1 to"
    ):
        Settings.from_env(env)


def test_django_campaigns_take_a_weight() -> None:
    pytest.importorskip("django")
    from xsp_middleware.django.conf import settings_from_dict

    settings = settings_from_dict({"CAMPAIGNS": [{"ID": "c1", "WEIGHT": 4}]}, environ={})
    assert Rules.from_settings(settings).rule_for("c1").weight == 4
    with pytest.raises(
        ConfigError,
        match=r"^XSP_MIDDLEWARE\['CAMPAIGNS'\]\[0\]: campaign c1 weight: must be a whole number",
    ):
        settings_from_dict({"CAMPAIGNS": [{"id": "c1", "weight": 0}]}, environ={})


# -- the admin API, on every topology ---------------------------------------------------------


async def test_set_campaign_weight_on_every_store(store_url: str) -> None:
    store = Store(Rules.from_settings(Settings(redis_url=store_url)))
    other = Store(
        Rules.from_settings(Settings(redis_url=store_url, campaigns=[Campaign(id="w", weight=8)]))
    )
    cid = "w"
    try:
        assert (await store.get_campaign(cid)).weight == 1
        assert (await other.get_campaign(cid)).weight == 8  # its settings, nothing stored
        view = await store.set_campaign(cid, weight=4)
        assert (view.weight, view.config.weight) == (4, 4)
        assert (await other.get_campaign(cid)).weight == 4  # the store wins
        assert (await store.set_campaign(cid, weight="12")).weight == 12  # the CLI's text
        assert (await store.set_campaign(cid, budget="3.00")).weight == 12
        for bad in (0, -1, 1.5, True, "abc", "1.0", 1_000_001):
            with pytest.raises(ConfigError, match=r"^weight: must be a whole number"):
                await store.set_campaign(cid, weight=bad, budget="9.00")  # type: ignore[arg-type]
        view = await other.get_campaign(cid)
        assert (view.weight, str(view.budget)) == (12, "3.0000000")
        assert await store.delete_campaign(cid)
        assert (await other.get_campaign(cid)).weight == 8
    finally:
        await store.aclose()
        await other.aclose()
