"""The wire protocol: what travels through Redis and how (private; users never import it).

- `keys`: every Redis key and queue name.
- `envelope`: a request as a Celery task message (JSON only).
- `scripts`: the Lua scripts that make each queue and job operation one round trip.
- `results`: result records, in Celery's result-backend format.
- `transport`: enqueue a request and await its result on one event loop.
- `jobs`: the job records behind `/jobs` and the client's jobs.
- `connections`: how Redis clients are built.
"""
