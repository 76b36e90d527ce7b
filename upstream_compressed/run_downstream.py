"""S3PRL's ``run_downstream.py`` with this plugin's shims and upstreams in place.

    python -m upstream_compressed.run_downstream -m train -u <upstream> -k <ckpt> -d ctc -c <yaml> ...
    run_downstream.py ...            # the same, as the console script setup.py installs

Arguments are S3PRL's own, unchanged; see ``downstream_configs/*.yaml`` for PR and SID.

S3PRL reads ``./downstream/<task>/config.yaml`` when ``-c`` is not given, a file its PyPI package
does not have. When that file is absent too, ``-d ctc`` and ``-d voxceleb1`` get the SUPERB config
this package ships (:data:`DEFAULT_CONFIGS`), with its data paths from ``-o`` or from
``$LIBRISPEECH``, ``$LIBRISPEECH_LEXICON`` and ``$VOXCELEB1`` (``overrides.complete_data_paths``);
one still a placeholder stops the run before training. With ``-c``, ``-e``, or that file present,
S3PRL runs exactly as it would alone.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path
from typing import Callable, MutableSequence

import upstream_compressed
from upstream_compressed import s3prl_compat
from upstream_compressed.bundled import bundled_config
from upstream_compressed.overrides import DataPathError, complete_data_paths

# -d -> the bundled SUPERB config used when S3PRL's default config file is missing.
DEFAULT_CONFIGS = {"ctc": "ctc_libriphone", "voxceleb1": "voxceleb1"}
PROGRAM = "run_downstream.py"


def s3prl_default_config(downstream: str) -> str:
    """The path S3PRL's ``run_downstream`` opens when ``-c`` is not given (relative to the current folder)."""
    return f"./downstream/{downstream}/config.yaml"


def _options_that_choose_the_config(argv: MutableSequence[str]) -> argparse.Namespace:
    """``-c``, ``-d`` and ``-e`` as S3PRL's parser reads them; every other argument is left alone."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("-c", "--config")
    parser.add_argument("-d", "--downstream")
    parser.add_argument("-e", "--past_exp")
    return parser.parse_known_args(list(argv[1:]))[0]


def supplied_config(argv: MutableSequence[str]) -> Path | None:
    """The bundled config to use for this command line, or None where S3PRL's own choice stands."""
    options = _options_that_choose_the_config(argv)
    if options.config is not None or options.past_exp is not None or options.downstream not in DEFAULT_CONFIGS:
        return None
    if os.path.exists(s3prl_default_config(options.downstream)):
        return None
    return bundled_config(DEFAULT_CONFIGS[options.downstream])


def supply_config(argv: MutableSequence[str], config: Path) -> None:
    """Put ``-c config`` first, so that any config option S3PRL finds later in ``argv`` still wins."""
    argv[1:1] = ["-c", str(config)]


def completing_data_paths(get_downstream_args: Callable, config: Path) -> Callable:
    """S3PRL's ``get_downstream_args``, then the bundled config's data paths filled in and checked.

    Runs after S3PRL applied ``-o`` (so ``-o`` wins over the environment) and before it builds
    anything. Resumed runs (``-e``, ``-a``) take their config from the checkpoint and are left alone.
    """

    @functools.wraps(get_downstream_args)
    def wrapped():
        args, loaded, backup_files = get_downstream_args()
        if args.past_exp is None and Path(args.config) == config:
            print(f"[{PROGRAM}] - no -c and no {s3prl_default_config(args.downstream)}: using the SUPERB config "
                  f"shipped with upstream_compressed, {config}", file=sys.stderr)
            for note in complete_data_paths(args.downstream, loaded, os.environ):
                print(f"[{PROGRAM}] - {note}", file=sys.stderr)
        return args, loaded, backup_files

    return wrapped


def main() -> None:
    """Apply the shims, register our upstreams, then run S3PRL's ``run_downstream.main()``.

    ``sys.argv`` reaches S3PRL unchanged, except that torchrun's local rank is spelled the way
    S3PRL parses it (``--local_rank``; see ``s3prl_compat.fix_local_rank_argv``) and, where S3PRL
    would open a config file that does not exist, ``-c`` names the bundled one (see above).
    """
    s3prl_compat.apply(argv=sys.argv)
    upstream_compressed.register()
    from s3prl import run_downstream

    config = supplied_config(sys.argv)
    if config is None:
        run_downstream.main()
        return
    supply_config(sys.argv, config)
    original = run_downstream.get_downstream_args
    run_downstream.get_downstream_args = completing_data_paths(original, config)
    try:
        run_downstream.main()
    except DataPathError as error:
        print(f"{PROGRAM}: error: {error}", file=sys.stderr)
        sys.exit(2)
    finally:
        run_downstream.get_downstream_args = original


if __name__ == "__main__":
    main()
