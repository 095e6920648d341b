"""The Ray Serve quickstart's Counter, with FastAPI as its HTTP interface.

    celery-serve run examples.counter:app
    curl http://127.0.0.1:8000/        ->  {"count": 0}
    curl http://127.0.0.1:8000/incr    ->  {"count": 1}
    curl http://127.0.0.1:8000/decr    ->  {"count": 0}

The count lives in the replica (one replica by default), as in the original.
"""

from fastapi import FastAPI

from celery_serve import deployment, ingress

api = FastAPI()


@deployment
@ingress(api)
class Counter:
    def __init__(self) -> None:
        self.count = 0

    @api.get("/")
    def get(self) -> dict[str, int]:
        return {"count": self.count}

    @api.get("/incr")
    def incr(self) -> dict[str, int]:
        self.count += 1
        return {"count": self.count}

    @api.get("/decr")
    def decr(self) -> dict[str, int]:
        self.count -= 1
        return {"count": self.count}


app = Counter.bind()
