"""Entry point: `python -m local_backend serve --model ... --port ...`."""

import sys

from .cli import main

sys.exit(main())
