"""Identity and consent: the anonymous policy, GPC / opt-out cookie / stored opt-out / TCF
signals under each consent policy, stored preferences checked in the same round trip."""

from __future__ import annotations

from typing import Any

import pytest
import redis
from conftest import SECRET, as_user, client
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from xsp_middleware import XSPMiddleware

WITH_PURPOSE_1 = "COwxsONOwxsONKpAAAENAdCAAMAAAAAAAAAAAAAAAAAA"  # iabtcf-java's test string
WITHOUT_PURPOSE_1 = "COtybn4PA_zT4KjACBENAPCIAEBAAECAAIAAAAAAAAAA"  # purposes {2, 10}


def keys(redis_url: str) -> list[bytes]:
    return list(redis.Redis.from_url(redis_url).scan_iter("*", count=1000))


def decision_fields(text: str) -> dict[str, str]:
    parts = text.split("|")
    return {"allowed": parts[0], "reason": parts[1], "left": parts[4], "anonymous": parts[6]}


SIGNALS = {
    "gpc": ("/decision?campaign_id=c1", {"sec-gpc": "1"}),
    "optout_cookie": ("/decision?campaign_id=c1", {"cookie": "user_id=u1; xsp_optout=1"}),
    "tcf": (f"/decision?campaign_id=c1&gdpr=1&gdpr_consent={WITHOUT_PURPOSE_1}", {}),
    "tcf_missing": ("/decision?campaign_id=c1&gdpr=1", {}),
    "tcf_malformed": ("/decision?campaign_id=c1&gdpr=1&gdpr_consent=%%%not-a-tc-string", {}),
}


@pytest.mark.parametrize("signal", sorted(SIGNALS))
async def test_each_signal_under_no_tracking_serves_and_leaves_no_user_key(
    redis_url: str, make_app: Any, signal: str
) -> None:
    app = make_app(redis_url=redis_url, default_caps=["1/1h"])
    path, headers = SIGNALS[signal]
    headers = {"cookie": "user_id=u1", **headers}
    async with client(app) as c:
        for _ in range(3):  # served every time: caps are not applied without tracking
            r = await c.get(path, headers=headers)
            assert r.status_code == 200
            assert decision_fields(r.text)["left"] == "None"
    user_key = app.store.user_key("u1").encode()
    assert user_key not in keys(redis_url)
    assert (await app.store.get_campaign("c1")).impressions == 3  # the budget still counts


async def test_a_stored_opt_out_is_honoured_in_the_same_round_trip(
    redis_url: str, make_app: Any
) -> None:
    app = make_app(redis_url=redis_url, default_caps=["1/1h"])
    user_key = app.store.user_key("u1")
    redis.Redis.from_url(redis_url).hset(user_key, "!o", "1")
    async with client(app) as c:
        codes = [
            (await c.get("/ad?campaign_id=c1", headers=as_user("u1"))).status_code for _ in range(3)
        ]
    assert codes == [200, 200, 200]
    assert redis.Redis.from_url(redis_url).hgetall(user_key) == {b"!o": b"1"}  # no log written


@pytest.mark.parametrize("signal", ["gpc", "optout_cookie", "stored_optout", "tcf"])
async def test_consent_policy_deny_answers_no_consent(
    redis_url: str, make_app: Any, signal: str
) -> None:
    app = make_app(redis_url=redis_url, consent_policy={signal: "deny"})
    headers = {"cookie": "user_id=u1"}
    path = "/ad?campaign_id=c1"
    if signal == "gpc":
        headers["sec-gpc"] = "1"
    elif signal == "optout_cookie":
        headers["cookie"] += "; xsp_optout=yes"
    elif signal == "stored_optout":
        redis.Redis.from_url(redis_url).hset(app.store.user_key("u1"), "!o", "1")
    else:
        path += f"&gdpr=1&gdpr_consent={WITHOUT_PURPOSE_1}"
    async with client(app) as c:
        r = await c.get(path, headers=headers)
    assert (r.status_code, r.headers["x-xsp-decision"]) == (204, "no_consent")


async def test_consent_policy_ignore_keeps_tracking(redis_url: str, make_app: Any) -> None:
    app = make_app(redis_url=redis_url, default_caps=["1/1h"], consent_policy="ignore")
    headers = {"cookie": "user_id=u1", "sec-gpc": "1"}
    async with client(app) as c:
        codes = [(await c.get("/ad?campaign_id=c1", headers=headers)).status_code for _ in range(2)]
    assert codes == [200, 204]


async def test_tcf_with_purpose_one_consent_is_tracked(redis_url: str, make_app: Any) -> None:
    app = make_app(redis_url=redis_url, default_caps=["1/1h"])
    path = f"/ad?campaign_id=c1&gdpr=1&gdpr_consent={WITH_PURPOSE_1}"
    async with client(app) as c:
        codes = [(await c.get(path, headers=as_user("u1"))).status_code for _ in range(2)]
    assert codes == [200, 204]


async def test_a_blocked_campaign_is_denied_in_one_round_trip(
    redis_url: str, make_app: Any
) -> None:
    app = make_app(redis_url=redis_url)
    redis.Redis.from_url(redis_url).hset(app.store.user_key("u1"), "!b", "other,c1")
    async with client(app) as c:
        blocked = await c.get("/ad?campaign_id=c1", headers=as_user("u1"))
        fine = await c.get("/ad?campaign_id=c2", headers=as_user("u1"))
    assert (blocked.status_code, blocked.headers["x-xsp-decision"]) == (204, "user_blocked")
    assert fine.status_code == 200
    assert (await app.store.get_campaign("c1")).denials["user_blocked"] == 1


async def test_anonymous_deny(redis_url: str, make_app: Any) -> None:
    app = make_app(redis_url=redis_url, anonymous="deny")
    async with client(app) as c:
        r = await c.get("/ad?campaign_id=c1")
        ok = await c.get("/ad?campaign_id=c1", headers=as_user("u1"))
    assert (r.status_code, r.headers["x-xsp-decision"]) == (204, "anonymous")
    assert ok.status_code == 200


async def test_anonymous_shared_is_the_tutorials_single_bucket(
    redis_url: str, make_app: Any
) -> None:
    app = make_app(redis_url=redis_url, anonymous="shared")  # default cap 3/1h
    async with client(app) as c:
        codes = [(await c.get("/ad?campaign_id=c1")).status_code for _ in range(4)]
    assert codes == [200, 200, 200, 204]


async def test_anonymous_allow_serves_uncapped(redis_url: str, make_app: Any) -> None:
    app = make_app(redis_url=redis_url, default_caps=["1/1h"])
    async with client(app) as c:
        r = [await c.get("/decision?campaign_id=c1") for _ in range(3)]
    assert [x.status_code for x in r] == [200, 200, 200]
    assert decision_fields(r[0].text)["anonymous"] == "True"


async def test_assign_issues_a_cookie_caps_under_it_and_keeps_the_apps_cookies(
    redis_url: str,
) -> None:
    async def ad(request: Request) -> Response:
        response = PlainTextResponse("ad")
        response.set_cookie("session", "abc")
        return response

    app = XSPMiddleware(
        Starlette(routes=[Route("/ad", ad)]),
        redis_url=redis_url,
        secret_key=SECRET,
        anonymous="assign",
        default_caps=["1/1h"],
        cookie_domain="ads.example.com",
        cookie_max_age=86400,
        cookie_samesite="none",
    )
    async with client(app) as c:
        first = await c.get("/ad?campaign_id=c1")
        cookies = first.headers.get_list("set-cookie")
        assert any(h.startswith("session=abc") for h in cookies)
        (ours,) = [h for h in cookies if h.startswith("user_id=")]
        assert "Max-Age=86400" in ours and "Domain=ads.example.com" in ours
        assert "SameSite=None" in ours and "Secure" in ours and "HttpOnly" in ours
        user_id = ours.split(";")[0].split("=", 1)[1]
        assert len(user_id) == 32  # 128 random bits, hex
        again = await c.get("/ad?campaign_id=c1", headers={"cookie": f"user_id={user_id}"})
    assert first.status_code == 200
    assert (again.status_code, again.headers["x-xsp-decision"]) == (204, "frequency_capped")
    assert "set-cookie" not in again.headers  # a known user gets no new id


async def test_no_raw_user_id_in_any_key_or_value(redis_url: str, make_app: Any) -> None:
    app = make_app(redis_url=redis_url, user_caps=["9/1d"])
    users = ["alice@example.com", "bob-1234567", "carol.secret"]
    async with client(app) as c:
        for user in users:
            await c.get("/ad?campaign_id=c1", headers=as_user(user))
            await c.get("/ad?campaign_id=c2", headers={"cookie": f"user_id={user}", "sec-gpc": "1"})
    r = redis.Redis.from_url(redis_url)
    dump = b""
    for key in keys(redis_url):
        dump += key
        if r.type(key) == b"hash":
            dump += b"".join(k + v for k, v in r.hgetall(key).items())
    for user in users:
        assert user.encode() not in dump


def test_flask_assigns_ids_and_honours_gpc(redis_url: str) -> None:
    from flask import Flask, make_response

    from xsp_middleware.wsgi import XSPWSGIMiddleware

    flask = Flask(__name__)

    @flask.get("/ad")
    def ad() -> Any:
        response = make_response("ad")
        response.set_cookie("session", "abc")
        return response

    flask.wsgi_app = XSPWSGIMiddleware(  # type: ignore[method-assign]
        flask.wsgi_app,
        redis_url=redis_url,
        secret_key=SECRET,
        anonymous="assign",
        default_caps=["1/1h"],
    )
    c = flask.test_client()
    first = c.get("/ad?campaign_id=f1")
    cookies = first.headers.get_all("Set-Cookie")
    assert any(h.startswith("session=abc") for h in cookies)
    (ours,) = [h for h in cookies if h.startswith("user_id=")]
    assert "HttpOnly" in ours and "Secure" in ours
    # The test client's jar now holds the assigned id: the next request is capped under it.
    assert c.get("/ad?campaign_id=f1").headers["X-XSP-Decision"] == "frequency_capped"
    fresh = flask.test_client()
    fresh.set_cookie("user_id", "gpc-user")
    assert fresh.get("/ad?campaign_id=f1", headers={"Sec-GPC": "1"}).status_code == 200
    store_key = XSPMiddleware(plain_app, secret_key=SECRET).store.user_key("gpc-user").encode()
    assert store_key not in keys(redis_url)


async def plain_app(scope: Any, receive: Any, send: Any) -> None:  # only to derive keys
    raise AssertionError("not called")


async def test_no_cookie_can_take_over_the_shared_bucket(redis_url: str, make_app: Any) -> None:
    app = make_app(redis_url=redis_url, anonymous="shared")  # default cap 3/1h
    async with client(app) as c:
        assert [(await c.get("/ad?campaign_id=c1")).status_code for _ in range(3)] == [200] * 3
        # A client naming itself "anonymous" is a user of its own, not the shared bucket.
        assert (await c.get("/ad?campaign_id=c1", headers=as_user("anonymous"))).status_code == 200
        assert (await c.get("/ad?campaign_id=c1")).status_code == 204


async def test_a_blocked_campaign_stays_blocked_after_an_opt_out(
    redis_url: str, make_app: Any
) -> None:
    app = make_app(redis_url=redis_url)
    redis.Redis.from_url(redis_url).hset(app.store.user_key("u1"), mapping={"!o": "1", "!b": "c1"})
    async with client(app) as c:
        r = await c.get("/ad?campaign_id=c1", headers=as_user("u1"))
    assert r.headers["x-xsp-decision"] == "user_blocked"


async def test_a_percent_encoded_gdpr_parameter_is_still_a_signal(
    redis_url: str, make_app: Any
) -> None:
    app = make_app(redis_url=redis_url, default_caps=["1/1h"])
    async with client(app) as c:
        r = await c.get("/decision?campaign_id=c1&%67dpr=1", headers=as_user("u1"))
    assert decision_fields(r.text)["left"] == "None"  # untracked: no Purpose 1 consent
    assert app.store.user_key("u1").encode() not in keys(redis_url)


def test_nested_wsgi_layers_decide_once_and_assign_one_id(redis_url: str) -> None:
    from werkzeug.test import Client

    from xsp_middleware.wsgi import XSPWSGIMiddleware

    def app(environ: Any, start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ad"]

    options = {"redis_url": redis_url, "secret_key": SECRET, "anonymous": "assign"}
    nested = XSPWSGIMiddleware(XSPWSGIMiddleware(app, **options), **options)
    r = Client(nested).get("/ad?campaign_id=nw")
    assert len(r.headers.getlist("Set-Cookie")) == 1
    assert int(redis.Redis.from_url(redis_url).hget("xsp:c:{nw}:st", "impressions")) == 1
