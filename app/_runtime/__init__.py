"""Run-time orchestration (private): deploying specs, starting and stopping processes, the handle loop.

- `spec`: an application's spec, the JSON in Redis that gateways, workers and the scaler agree on.
- `serve`: `run()` / `shutdown()` and the processes they start.
- `launcher`: starting and stopping child processes (embedded Redis, gateway, workers, Flower).
- `context`: where this process finds Redis, and the background loop handles use.
"""
