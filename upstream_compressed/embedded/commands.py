"""The ``make-corpus`` and ``pretrain`` subcommands of ``upstream-compressed``.

``cli.py`` calls :func:`add_commands` on its subparsers; ``python -m upstream_compressed.embedded``
runs the same two commands on their own.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

MAKE_CORPUS_HELP = """\
Synthesise a small English speech corpus offline with espeak-ng (Python package espeakng-loader)
and write it in the two layouts that S3PRL's unchanged downstreams read:

  DIR/LibriSpeech/{train-clean-100,dev-clean,test-clean}/SPK/CHAPTER/*.flac + SPK-CHAPTER.trans.txt
  DIR/lexicon.txt  DIR/phoneme.txt            (ARPAbet with stress; for -d ctc, corpus libriphone)
  DIR/VoxCeleb1/{dev,test}/wav/id1xxxx/VIDEO/NNNNN.wav + DIR/VoxCeleb1/iden_split.txt (for -d voxceleb1)
  DIR/corpus.json                              options, speakers, counts and hours

Sentences of 4-12 words from a fixed vocabulary of 465 common words; a speaker is an espeak-ng voice
variant x pitch level with its own pitch range and rate. LibriSpeech speakers are disjoint across
splits; VoxCeleb1 has a second, disjoint set of speakers, each with 5 recording sessions (videos):
3 train, 1 dev, 1 test. The defaults give about 1.9 hours of 16 kHz audio in about a minute or two.
The same options give byte-identical files.

Then, from the repository root:
  run_downstream.py -m train -u hubert_tiny -d ctc -c downstream_configs/ctc_libriphone_embedded.yaml \\
      -o config.downstream_expert.corpus.path=DIR/LibriSpeech,,config.downstream_expert.corpus.lexicon=DIR/lexicon.txt,,config.downstream_expert.text.vocab_file=DIR/phoneme.txt
(the embedded configs point at data/embedded_corpus by default, so -o is not needed for that DIR).
"""

PRETRAIN_HELP = """\
HuBERT's first pretraining iteration for a small model on a corpus made by make-corpus:
MFCC (+deltas) k-means targets at 100 Hz, masked prediction with S3PRL's own HubertModel.
Writes S3PRL's converted HuBERT checkpoint (loadable by `-u hubert_local -k OUT.pt`), fp16 weights
by default, atomically, plus OUT.json beside it with the command, seed, data and training log.

  upstream-compressed pretrain data/embedded_corpus -o tiny_hubert.pt
  upstream-compressed pretrain --init-only -o random_tiny_hubert.pt     # same shape, random weights

Use one CPU thread (the default) on a shared machine: more threads slow these small ops down.
"""


def _make_corpus(args: argparse.Namespace) -> int:
    from .espeak import EspeakError
    from .synth_corpus import CorpusOptions, CorpusOptionsError, make_corpus

    options = CorpusOptions(
        speakers=args.speakers, utterances=args.utterances, sid_utterances=args.sid_utterances, seed=args.seed
    )
    started = time.time()
    try:
        corpus = make_corpus(args.dir, options, progress=not args.quiet, overwrite=args.overwrite)
    except (CorpusOptionsError, EspeakError, FileExistsError) as error:
        print(f"upstream-compressed make-corpus: error: {error}", file=sys.stderr)
        return 2
    import json

    manifest = json.loads(corpus.manifest.read_text())
    print(
        f"wrote {corpus.root}: {manifest['hours_total']:.2f} h, "
        f"{manifest['librispeech']['utterances']} LibriSpeech + {manifest['voxceleb1']['utterances']} VoxCeleb1 "
        f"utterances, {options.speakers} + {options.speakers} speakers, in {time.time() - started:.0f} s"
    )
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    from .pretrain import ModelShape, PretrainError, TrainOptions, pretrain

    if args.corpus is None and not args.init_only:
        print("upstream-compressed pretrain: error: give the corpus DIR (or --init-only)", file=sys.stderr)
        return 2
    shape = ModelShape(
        conv_feature_layers=args.conv_layers,
        encoder_layers=args.layers,
        encoder_embed_dim=args.dim,
        encoder_ffn_embed_dim=args.ffn,
        encoder_attention_heads=args.heads,
    )
    options = TrainOptions(
        clusters=args.clusters,
        steps=args.steps,
        batch_seconds=args.batch_seconds,
        lr=args.lr,
        seed=args.seed,
        threads=args.threads,
        eval_every=args.eval_every,
        feature_grad_mult=args.feature_grad_mult,
        nomask_weight=args.nomask_weight,
        mask_prob=args.mask_prob,
        fp16_weights=not args.fp32,
        device=args.device,
    )
    try:
        result = pretrain(
            args.corpus, args.output, shape, options,
            train_split=args.train_split, dev_split=args.dev_split or None,
            command=["upstream-compressed", *sys.argv[1:]] if args.command_line is None else args.command_line,
            progress=not args.quiet, init_only=args.init_only,
        )
    except (PretrainError, FileNotFoundError, ValueError) as error:
        print(f"upstream-compressed pretrain: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {result.checkpoint} ({result.parameters:,} parameters) and {result.recipe}")
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``make-corpus`` and ``pretrain`` to an argparse subparsers object."""
    raw = argparse.RawDescriptionHelpFormatter
    corpus = subparsers.add_parser(
        "make-corpus", help="synthesise the embedded speech corpus (LibriSpeech + VoxCeleb1 layouts)",
        description=MAKE_CORPUS_HELP, formatter_class=raw,
    )
    corpus.add_argument("dir", help="output folder (created; must not already hold a corpus unless --overwrite)")
    corpus.add_argument("--speakers", type=int, default=40, help="speakers per tree, 3-48 (default 40)")
    corpus.add_argument("--utterances", type=int, default=40, help="sentences per LibriSpeech speaker (default 40)")
    corpus.add_argument(
        "--sid-utterances", type=int, default=20, help="utterances per VoxCeleb1 speaker, at least 5 (default 20)"
    )
    corpus.add_argument("--seed", type=int, default=0, help="random seed: same seed, same bytes (default 0)")
    corpus.add_argument("--overwrite", action="store_true", help="replace a corpus already in DIR")
    corpus.add_argument("--quiet", action="store_true", help="no progress bar")
    corpus.set_defaults(run=_make_corpus)

    train = subparsers.add_parser(
        "pretrain", help="pretrain a tiny HuBERT (first iteration) on a make-corpus corpus",
        description=PRETRAIN_HELP, formatter_class=raw,
    )
    train.add_argument("corpus", nargs="?", help="corpus folder written by make-corpus (or any DIR/LibriSpeech/SPLIT)")
    train.add_argument("-o", "--output", required=True, help="checkpoint to write (.pt); OUT.json goes beside it")
    train.add_argument("--steps", type=int, default=2000, help="optimizer steps (default 2000)")
    train.add_argument("--batch-seconds", type=float, default=32.0, help="seconds of audio per batch (default 32)")
    train.add_argument("--lr", type=float, default=1e-3, help="peak learning rate, AdamW (default 1e-3)")
    train.add_argument("--feature-grad-mult", type=float, default=0.1, help="gradient scale into the conv front end (default 0.1)")
    train.add_argument("--nomask-weight", type=float, default=0.0, help="weight of the unmasked-frame loss (default 0)")
    train.add_argument("--mask-prob", type=float, default=0.8, help="span-start probability of masking (default 0.8)")
    train.add_argument("--clusters", type=int, default=100, help="k-means clusters = targets (default 100)")
    train.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    train.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    train.add_argument("--device", default="cpu", help="cpu or cuda (default cpu); results differ in the last bits")
    train.add_argument("--eval-every", type=int, default=200, help="steps between dev evaluations and checkpoint saves")
    train.add_argument("--train-split", default="train-clean-100", help="LibriSpeech split to train on")
    train.add_argument("--dev-split", default="dev-clean", help="split for masked-prediction accuracy ('' for none)")
    train.add_argument("--layers", type=int, default=4, help="Transformer layers (default 4)")
    train.add_argument("--dim", type=int, default=256, help="embedding dimension (default 256)")
    train.add_argument("--ffn", type=int, default=1024, help="feed-forward width (default 1024)")
    train.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    train.add_argument(
        "--conv-layers", default="[(64,10,5)] + [(64,3,2)] * 4 + [(128,2,2)] * 2",
        help="conv front end as HuBERT's conv_feature_layers string (default: HuBERT's strides, 64/128 channels)",
    )
    train.add_argument("--fp32", action="store_true", help="store fp32 weights (default: fp16, half the size)")
    train.add_argument("--init-only", action="store_true", help="write the randomly initialised model, no training")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.set_defaults(run=_pretrain, command_line=None)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m upstream_compressed.embedded",
        description="The embedded default: a synthetic speech corpus and a tiny pretrained HuBERT.",
    )
    add_commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    return args.run(args)
