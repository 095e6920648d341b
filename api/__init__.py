"""The HTTP gateway: FastAPI endpoints plus a proxy onto the deployments' queues."""
