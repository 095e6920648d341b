"""The Celery side of celery-serve: worker pools of replicas that drain their deployment's queue."""
