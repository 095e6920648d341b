"""The no-op deployment whose replicas the start-up benchmark starts (nothing to load, nothing to do)."""

from celery_serve import deployment


@deployment
def ready() -> str:
    return "ready"


app = ready.bind()
