"""The no-op deployment the overhead benchmark serves: it greets, like the floor app, and does nothing else."""

from celery_serve import deployment


@deployment(max_queued_requests=-1)
def noop(request) -> str:
    return f"Hello {request.query_params.get('name', 'world')}!"


app = noop.bind()
