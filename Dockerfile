# agent-state-proxy: README "Docker". No torch: the embedder's model files are package data.
FROM python:3.11-slim

# ASP_HOST / ASP_PORT / ASP_DATA_DIR stand in for serve's --host / --port / --data-dir; the health
# check reads the same ASP_PORT, so `-e ASP_PORT=9000 -p 9000:9000` moves both.
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    LITELLM_LOCAL_MODEL_COST_MAP=True \
    ASP_CONFIG=/app/config/proxy.yaml \
    ASP_HOST=0.0.0.0 \
    ASP_PORT=8765 \
    ASP_DATA_DIR=/data

WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY proxy ./proxy
COPY config ./config
RUN pip install --no-cache-dir -c constraints.txt . \
    && useradd --system --uid 10001 --home /app proxy \
    && mkdir -p /data \
    && chown proxy /data

# A bind-mounted host directory must be writable by uid 10001 (or run with --user <owner uid>);
# serve says so in one line when it is not. A named volume needs nothing.
USER 10001
VOLUME ["/data"]
EXPOSE 8765
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s \
    CMD ["python", "-c", "import os, sys, urllib.request; url = 'http://127.0.0.1:%s/ready' % os.environ.get('ASP_PORT', '8765'); sys.exit(0 if urllib.request.urlopen(url, timeout=2).status == 200 else 1)"]

# Host clients arrive from the bridge network, which the open default tenant does not admit:
# give them a keyed tenant (mount tenants/) or set ASP_ALLOW_CLIENTS (README "Docker").
CMD ["agent-state-proxy", "serve"]
