"""The deployment the jobs benchmark serves: trivial work, so the figures describe the job machinery."""

from celery_serve import deployment

NUM_REPLICAS = 3


# Unbounded queue: the benchmark submits 10,000 jobs faster than they run and measures, not refuses.
@deployment(num_replicas=NUM_REPLICAS, max_queued_requests=-1)
class Square:
    def __call__(self, x: int) -> int:
        return x * x


app = Square.bind()
