"""Ray Serve's quick start (the 1.x tutorial: `serve.start()`, `Counter.deploy()`, a rolling update), as
written there with one change: `import celery_serve as serve` instead of `import ray; from ray import serve`
(and no `ray.init()`: there is no Ray cluster to start).

    python examples/quickstart.py      # then: curl localhost:8000/Counter/incr

Workers import this script to find `Counter`: `serve.start()` and `.deploy()` do nothing there, and each
`Counter` is found by its place in the file, so the first deploy serves the first class.
"""

import celery_serve as serve

serve.start()


@serve.deployment
class Counter:
    def __init__(self):
        self.count = 0

    def __call__(self, request):
        self.count += 1
        return {"count": self.count}


Counter.deploy()

if __name__ == "__main__":  # what the tutorial does in the browser: http://127.0.0.1:8000/Counter
    import os

    import httpx

    base = f"http://127.0.0.1:{os.environ.get('SERVE_PORT', '8000')}"
    print(httpx.get(f"{base}/Counter").json())
    print(httpx.get(f"{base}/Counter").json())

from fastapi import FastAPI  # noqa: E402

app = FastAPI()


@serve.deployment
@serve.ingress(app)
class Counter:  # noqa: F811 - the tutorial defines it again: the new version
    def __init__(self):
        self.count = 0

    @app.get("/")
    def get(self):
        return {"count": self.count}

    @app.get("/incr")
    def incr(self):
        self.count += 1
        return {"count": self.count}

    @app.get("/decr")
    def decr(self):
        self.count -= 1
        return {"count": self.count}


Counter.deploy()

if __name__ == "__main__":  # the tutorial's curl commands
    print(httpx.get(f"{base}/Counter/").json())
    print(httpx.get(f"{base}/Counter/incr").json())
    print(httpx.get(f"{base}/Counter/decr").json())
