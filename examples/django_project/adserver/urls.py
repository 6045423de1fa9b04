from __future__ import annotations

from django.urls import path

from . import views

urlpatterns = [
    path("ad", views.serve_ad),
    path("ad/<str:campaign_id>", views.serve_campaign_ad),
    path("health", views.health),
]
