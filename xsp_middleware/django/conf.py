"""``settings.XSP_MIDDLEWARE`` (one dict, :class:`Settings`' names in upper case) -> Settings."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any

from django.core.exceptions import (  # type: ignore[import-untyped,unused-ignore]
    ImproperlyConfigured,
)

from ..errors import ConfigError
from ..settings import Campaign, Settings, _import_callable

SETTING = "XSP_MIDDLEWARE"
_NAMES = {f.name.upper(): f.name for f in dataclasses.fields(Settings)}
_CAMPAIGN_FIELDS = {f.name for f in dataclasses.fields(Campaign)}


class XSPImproperlyConfigured(ConfigError, ImproperlyConfigured):  # type: ignore[misc,unused-ignore]
    """A bad ``XSP_MIDDLEWARE`` (or ``XSP_*`` variable): Django's ``ImproperlyConfigured`` and
    our ``ConfigError`` at once, raised when Django loads the middleware (start-up)."""


def settings_from_django(conf: Any = None, environ: Mapping[str, str] | None = None) -> Settings:
    """The :class:`Settings` of ``conf.XSP_MIDDLEWARE`` (default: ``django.conf.settings``),
    with ``XSP_*`` environment variables filling what the dict leaves out.

    Raises :class:`ConfigError` (with the fix) for anything invalid.
    """
    if conf is None:
        from django.conf import settings  # type: ignore[import-untyped,unused-ignore]

        conf = settings
    return settings_from_dict(getattr(conf, SETTING, None), environ)


def settings_from_dict(
    raw: Mapping[str, Any] | None, environ: Mapping[str, str] | None = None
) -> Settings:
    """``{"REDIS_URL": ..., "DEFAULT_CAPS": [...], "CAMPAIGNS": [{...}]}`` -> Settings."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(
            f"{SETTING}: must be a dict such as {{'REDIS_URL': 'redis://...'}}, "
            f"not {type(raw).__name__}"
        )
    options: dict[str, Any] = {}
    unknown: list[str] = []
    for key, value in raw.items():
        name = _NAMES.get(key) if isinstance(key, str) else None
        if name is None:
            unknown.append(_unknown(key))
        else:
            options[name] = _value(name, value)
    if unknown:
        raise ConfigError(f"{SETTING}: unknown key(s): {'; '.join(unknown)}")
    try:
        return Settings.from_env(environ, **options)
    except ConfigError as exc:
        if str(exc).startswith("XSP_"):  # it names the environment variable already
            raise
        raise ConfigError(f"{SETTING}: {exc}") from None
    except (TypeError, ValueError, AttributeError) as exc:  # a value of the wrong type
        raise ConfigError(
            f"{SETTING} (or an XSP_* environment variable): {type(exc).__name__}: {exc}"
        ) from None


def _unknown(key: object) -> str:
    text = repr(key)
    if isinstance(key, str):
        close = difflib.get_close_matches(key.upper(), list(_NAMES), n=1)
        if close:
            return f"{text} (did you mean {close[0]!r}?)"
    return text


def _value(name: str, value: Any) -> Any:
    if name == "campaigns":
        return _campaigns(value)
    if name == "on_budget_exhausted" and isinstance(value, str):
        # "module:function", like XSP_ON_BUDGET_EXHAUSTED, or Django's dotted "module.function".
        path = value if ":" in value else ":".join(value.rsplit(".", 1))
        return _import_callable(f"{SETTING}['ON_BUDGET_EXHAUSTED']", path)
    return value


def _campaigns(value: Any) -> list[Campaign]:
    if isinstance(value, str | bytes | Mapping) or not hasattr(value, "__iter__"):
        raise ConfigError(f"{SETTING}['CAMPAIGNS']: must be a list of campaign dicts")
    campaigns: list[Campaign] = []
    for i, item in enumerate(value):
        what = f"{SETTING}['CAMPAIGNS'][{i}]"
        if isinstance(item, Campaign):
            campaigns.append(item)
            continue
        if not isinstance(item, Mapping):
            raise ConfigError(f"{what}: expected a dict with Campaign's fields or a Campaign")
        fields = {str(k).lower(): v for k, v in item.items()}
        extra = sorted(set(fields) - _CAMPAIGN_FIELDS)
        if extra:
            raise ConfigError(
                f"{what}: unknown field(s) {', '.join(extra)}; a campaign has "
                f"{', '.join(sorted(_CAMPAIGN_FIELDS))}"
            )
        if "id" not in fields:
            raise ConfigError(f"{what}: needs an 'id'")
        try:
            campaigns.append(Campaign(**fields))
        except ConfigError as exc:
            raise ConfigError(f"{what}: {exc}") from None
        except (TypeError, ValueError, AttributeError) as exc:  # a value of the wrong type
            raise ConfigError(f"{what}: {type(exc).__name__}: {exc}") from None
    return campaigns
