"""``python -m sqjax.cli``: the ``sqjax`` command."""

import sys

from sqjax.cli import main

sys.exit(main())
