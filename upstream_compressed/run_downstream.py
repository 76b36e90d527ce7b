"""S3PRL's ``run_downstream.py`` with this plugin's shims and upstreams in place.

    python -m upstream_compressed.run_downstream -m train -u <upstream> -k <ckpt> -d ctc -c <yaml> ...
    run_downstream.py ...            # the same, as the console script setup.py installs

Arguments are S3PRL's own, unchanged; see ``downstream_configs/*.yaml`` for PR and SID.
"""

from __future__ import annotations

import sys

import upstream_compressed
from upstream_compressed import s3prl_compat


def main() -> None:
    """Apply the shims, register our upstreams, then run S3PRL's ``run_downstream.main()`` as is.

    ``sys.argv`` reaches S3PRL unchanged, except that torchrun's local rank is spelled the way
    S3PRL parses it (``--local_rank``; see ``s3prl_compat.fix_local_rank_argv``).
    """
    s3prl_compat.apply(argv=sys.argv)
    upstream_compressed.register()
    from s3prl import run_downstream

    run_downstream.main()


if __name__ == "__main__":
    main()
