"""agent-state-proxy: an OpenAI-compatible sidecar that gives AI agents durable state."""

__version__ = "0.1.0"
