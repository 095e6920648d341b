"""The Ray Serve key-concepts composition: an ingress that calls two deployments through handles.

celery-serve run examples.composition:app
curl http://127.0.0.1:8000/         ->  Hello world!
"""

from celery_serve import DeploymentHandle, deployment


@deployment
class Hello:
    def __call__(self) -> str:
        return "Hello"


@deployment
class World:
    def __call__(self) -> str:
        return " world!"


@deployment
class Ingress:
    def __init__(self, hello_handle: DeploymentHandle, world_handle: DeploymentHandle) -> None:
        self._hello_handle = hello_handle
        self._world_handle = world_handle

    async def __call__(self) -> str:
        hello_response = self._hello_handle.remote()
        world_response = self._world_handle.remote()
        return (await hello_response) + (await world_response)


hello = Hello.bind()
world = World.bind()
# The deployments passed to the Ingress constructor are replaced with handles.
app = Ingress.bind(hello, world)
