"""The app config: ``INSTALLED_APPS += ["xsp_middleware.django"]`` registers the system checks."""

from __future__ import annotations

from django.apps import AppConfig  # type: ignore[import-untyped,unused-ignore]


class XSPConfig(AppConfig):  # type: ignore[misc,unused-ignore]
    name = "xsp_middleware.django"
    label = "xsp_middleware"
    verbose_name = "xsp-middleware"
    default = True

    def ready(self) -> None:
        from .checks import register

        register()
