"""`python -m celery_serve ...` is the `celery-serve` command."""

import sys

from celery_serve._cli import main

sys.exit(main())
