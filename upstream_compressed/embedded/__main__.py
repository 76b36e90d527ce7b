"""``python -m upstream_compressed.embedded make-corpus|pretrain ...`` (the same as ``upstream-compressed``)."""

import sys

from .commands import main

sys.exit(main())
