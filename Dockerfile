# The ¿Who Knows? app image: waitress serving app:app as a non-root user.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Two glibc malloc arenas instead of one per thread: the same throughput, less
# memory kept after a burst (bench/README.md, "Workers").
ENV MALLOC_ARENA_MAX=2

WORKDIR /app

# Dependencies first, in their own layer: rebuilt only when requirements change.
COPY requirements.txt .
RUN pip install -r requirements.txt

RUN useradd --system --uid 10001 --no-create-home --home-dir /app whoknows
COPY . .
USER whoknows

EXPOSE 8080

# /healthz answers 200 only when the database answers and the schema is current.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]

# `python app.py serve` (not waitress-serve): it builds the waitress server from
# the settings (WORKERS processes of 8 threads, each with a pool of 12
# connections and 200 client connections at most, idle clients dropped after
# 30 s, bodies over 1 MiB and headers over 64 KiB refused) and, on SIGTERM,
# lets the requests in flight finish. waitress cannot
# bound a slow-drip client that keeps sending: compose's nginx, in front, does
# (nginx/nginx.conf). It applies pending migrations first (none, after compose's migrate).
ENV HOST=0.0.0.0 PORT=8080
CMD ["python", "app.py", "serve"]
