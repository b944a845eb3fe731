"""A tenant's context-management options: the schema lives in proxy.config.context (one source of
defaults and rules); this name stays for the context package's modules."""

from proxy.config.context import OFF, STRATEGIES, ContextSettings, parse

__all__ = ["OFF", "STRATEGIES", "ContextSettings", "parse"]
