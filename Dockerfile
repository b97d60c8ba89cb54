# CPU image of prompt-server with the default model converted at build time.
#   docker build -t prompt-server .
#   docker run -p 8000:8000 -v adapters:/adapters prompt-server
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PROMPT_SERVER_CACHE_DIR=/models \
    PROMPT_SERVER_ADAPTERS=/adapters \
    PROMPT_SERVER_HOST=0.0.0.0 \
    PROMPT_SERVER_PORT=8000

# torch first, from the CPU-only index, so the package install below finds it satisfied.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "${TORCH_INDEX}" torch==2.13.0

WORKDIR /app
# The runtime alone: no extras, and not the benchmarks (prompt_server_bench, with their peft and matplotlib).
COPY pyproject.toml README.md ./
COPY prompt_server ./prompt_server
RUN pip install .

# Fetch and convert the default model now, so containers start offline and in seconds.
RUN python -m prompt_server.model.default

# The sample adapters seed the /adapters volume the first time it is mounted empty.
RUN useradd --create-home --uid 1000 server
COPY --chown=server:server adapters/ /adapters/
USER server

EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"
CMD ["prompt-server", "serve", "--host", "0.0.0.0", "--adapters", "/adapters"]
