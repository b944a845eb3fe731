"""Typed keys for what the aiohttp application holds."""

from __future__ import annotations

from aiohttp import web

from proxy.config import Config
from proxy.jobs import Claims
from proxy.pipeline import Pipeline
from proxy.quotas import Quotas
from proxy.server.body_probe import BodyProbe
from proxy.storage.base import Store
from proxy.upstream import Upstream

CONFIG = web.AppKey("config", Config)
STORE = web.AppKey("store", Store)
UPSTREAM = web.AppKey("upstream", Upstream)
PIPELINE = web.AppKey("pipeline", Pipeline)
QUOTAS = web.AppKey("quotas", Quotas)
READY = web.AppKey("ready", bool)
STARTED = web.AppKey("started", float)
BODY_PROBE = web.AppKey("body_probe", BodyProbe)
CLAIMS = web.AppKey("claims", Claims)
