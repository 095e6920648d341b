# The image every celery-serve service runs (see docker-compose.yml): the package, its model extra and
# the examples. CPU-only torch keeps it to about a gigabyte instead of several of CUDA libraries.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONPATH=/srv \
    HF_HUB_OFFLINE=1

WORKDIR /srv

# torch first and pinned, from the CPU index: its own layer, reused while the code changes.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

COPY . .
RUN pip install ".[models]" \
    && useradd --create-home --uid 10001 serve

USER serve
EXPOSE 8000
CMD ["celery-serve", "gateway", "--host", "0.0.0.0", "--port", "8000"]
