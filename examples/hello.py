"""A function deployment that greets by query parameter.

celery-serve run examples.hello:app
curl 'http://127.0.0.1:8000/?name=Ada'      ->  Hello Ada!
"""

from celery_serve import deployment


@deployment
def hello(request) -> str:
    name = request.query_params.get("name", "world")
    return f"Hello {name}!"


app = hello.bind()
