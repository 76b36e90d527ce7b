"""Wall-clock time of upstreams relative to a base, measured interleaved in one process.

Timing each model on its own (``upstream-compressed profile``, one process per model) compares
machine states minutes apart: on a quiet machine a model with fewer MACs came out 1.3x slower than
its base. Here every model is loaded in one process and timed in rounds: each round runs every model
once, round ``r`` starting at model ``r mod n`` (so that no model always runs first, after the same
neighbour, or with the caches its predecessor left), and each model's time is divided by the base's
time *in the same round*.

Reported per model (:func:`time_against_base`):

- ``time_ratio_to_base``: the median over rounds of the per-round ratio (model / base);
- ``time_ratio_iqr``: ``[q25, q75]``, the 25th and 75th percentiles of those per-round ratios (linear
  interpolation between order statistics; ``[r, r]`` for a single round);
- ``rounds``: how many ratios that is; ``timed_beside``: the base's name;
- ``median_seconds_interleaved`` and ``rtf_interleaved``: the model's own median forward time over the
  same rounds, and that over the audio's length.

Why paired ratios, not the ratio of two medians: a change of machine state (another job starting,
clock frequency, thermal or memory pressure) that lasts longer than a round scales the model's and
the base's time of that round alike, so it cancels in their ratio; the two medians can come from
rounds in different states, and the ratio of medians carries the drift. The spread of the per-round
ratios is also the spread of the comparison itself, which two separate medians do not give.

The generic loop (:func:`interleaved_times`) also serves ``benchmarks/common.interleaved_medians``.
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from .upstream_profile import SAMPLE_RATE, ProfileError, load_upstream, resolve_device, seeded_audio


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a wall-clock reading covers it (nothing to wait for on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rotated_order(round_: int, count: int) -> list[int]:
    """The order of ``count`` models in round ``round_``: it starts at model ``round_ mod count``."""
    return [(round_ + k) % count for k in range(count)]


def interleaved_times(runs: Sequence[Callable[[], Any]], rounds: int, warmup: int = 1,
                      device: torch.device = torch.device("cpu")) -> list[list[float]]:
    """``times[i][r]``: seconds of ``runs[i]()`` in round ``r``, all under ``torch.inference_mode``.

    First ``warmup`` untimed calls of each run (one run after the other), then ``rounds`` rounds that
    call every run once in :func:`rotated_order`; each call is bracketed by :func:`synchronize`."""
    times: list[list[float]] = [[] for _ in runs]
    with torch.inference_mode():
        for run in runs:
            for _ in range(warmup):
                run()
        for round_ in range(rounds):
            for i in rotated_order(round_, len(runs)):
                synchronize(device)
                start = time.perf_counter()
                runs[i]()
                synchronize(device)
                times[i].append(time.perf_counter() - start)
    return times


def _quartiles(values: list[float]) -> list[float]:
    """[25th, 75th] percentile, linear interpolation (``statistics.quantiles`` refuses a single value)."""
    q25, q75 = torch.quantile(torch.tensor(values, dtype=torch.float64), torch.tensor([0.25, 0.75],
                                                                                     dtype=torch.float64))
    return [q25.item(), q75.item()]


def _check(names: Sequence[str], base: str, rounds: int, warmup: int) -> None:
    if rounds < 1:
        raise ProfileError(f"--rounds must be at least 1, not {rounds}")
    if warmup < 0:
        raise ProfileError(f"--warmup must be at least 0, not {warmup}")
    if base not in names:
        raise ProfileError(f"the base {base!r} is not among the models timed ({', '.join(names) or 'none'})")


def time_against_base(upstreams: Mapping[str, nn.Module], base: str, wav: torch.Tensor | float, rounds: int = 10,
                      warmup: int = 1, device: str | torch.device = "cpu") -> dict[str, dict[str, Any]]:
    """Each upstream's time relative to ``upstreams[base]``, timed interleaved (see the module docstring).

    ``wav``: a 1-D waveform at 16 kHz, or a length in seconds (then :func:`seeded_audio`). Every upstream is
    called as S3PRL calls one, ``upstream([wav])``, in eval mode on ``device``."""
    names = list(upstreams)
    _check(names, base, rounds, warmup)
    target = device if isinstance(device, torch.device) else resolve_device(device)
    wav = seeded_audio(float(wav), target) if not isinstance(wav, torch.Tensor) else wav.to(target)
    modules = [upstreams[name].eval().to(target) for name in names]
    times = interleaved_times([lambda m=m: m([wav]) for m in modules], rounds, warmup, target)
    base_times = times[names.index(base)]
    seconds_audio = wav.shape[-1] / SAMPLE_RATE
    result = {}
    for name, own in zip(names, times):
        ratios = [t / b for t, b in zip(own, base_times)]
        median = statistics.median(own)
        result[name] = {
            "timed_beside": base,
            "time_ratio_to_base": statistics.median(ratios),
            "time_ratio_iqr": _quartiles(ratios),
            "rounds": rounds,
            "median_seconds_interleaved": median,
            "rtf_interleaved": median / seconds_audio,
        }
    return result


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to ``threads`` (None: left as it is) while the block runs."""
    if threads is None:
        yield
        return
    if threads < 1:
        raise ProfileError(f"--threads must be at least 1, not {threads}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def time_models_against_base(models: Sequence[Mapping[str, Any]], base_name: str, seconds: float = 10.0,
                             rounds: int = 10, warmup: int = 1, threads: int | None = None,
                             device: str = "cpu") -> dict[str, dict[str, Any]]:
    """:func:`time_against_base` for models described as ``models/<name>/model.json`` describes them.

    Each entry needs ``model`` (its name), ``upstream`` and optionally ``ckpt``; each is built by
    :func:`~upstream_compressed.upstream_profile.load_upstream` (any upstream S3PRL knows once this
    plugin is registered). All are held in memory at once. Returns ``{name: fields}``; the fields'
    names do not clash with ``profile``'s, so they can be merged into a model's ``profile.json``."""
    names = [m["model"] for m in models]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ProfileError(f"model names must be unique; repeated: {', '.join(duplicates)}")
    _check(names, base_name, rounds, warmup)  # before loading anything
    target = resolve_device(device)
    wav = seeded_audio(seconds, target)
    with torch_threads(threads):
        upstreams = {m["model"]: load_upstream(m["upstream"], m.get("ckpt")) for m in models}
        return time_against_base(upstreams, base_name, wav, rounds, warmup, target)


def format_table(results: Mapping[str, Mapping[str, Any]], header: str) -> str:
    """A short table of :func:`time_against_base`'s result, one model a line, under ``header``."""
    width = max(len("model"), *(len(name) for name in results))
    lines = [header, f"{'model':<{width}}  ratio to base  IQR of round ratios   median ms   RTF"]
    for name, row in results.items():
        q25, q75 = row["time_ratio_iqr"]
        lines.append(f"{name:<{width}}  {row['time_ratio_to_base']:>13.3f}  {q25:>8.3f} - {q75:<8.3f}  "
                     f"{row['median_seconds_interleaved'] * 1000:>10.2f}   {row['rtf_interleaved']:.4f}")
    return "\n".join(lines)
