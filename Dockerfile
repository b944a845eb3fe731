FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    LITELLM_LOCAL_MODEL_COST_MAP=True \
    ASP_CONFIG=/app/config/proxy.yaml

WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY proxy ./proxy
COPY config ./config
RUN pip install --no-cache-dir -c constraints.txt . \
    && useradd --system --uid 10001 --home /app proxy \
    && mkdir -p /data && chown proxy /data

USER proxy
VOLUME ["/data"]
EXPOSE 8765
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s \
    CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8765/ready', timeout=2).status == 200 else 1)"

# In a container the proxy must bind 0.0.0.0; give tenants API keys (the open default
# tenant admits loopback clients only).
CMD ["agent-state-proxy", "serve", "--host", "0.0.0.0", "--data-dir", "/data"]
