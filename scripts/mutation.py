#!/usr/bin/env python
"""Mutation testing of the modules whose bugs would silently corrupt a compressed model (not run in CI).

Runs mutmut over delta.py, compress/selection.py, model/sparse.py, train/stream.py and
compress/importance.py, each with only the test files that exercise it directly (:data:`MODULES`;
the end-to-end ``compress`` tests are left out: tens of seconds per mutant), and prints per module
how many mutants were killed, survived, timed out or ended otherwise (``other``: mostly code no
selected test reaches), then one JSON line with every count. A survivor or other listed in
:data:`EXPLAINED` (an equivalent mutant, or code only a GPU runs) counts as ``explained``, any
other as ``unexplained``; the exit status is 1 while an unexplained or unchecked one remains.

It never touches the working tree: each module runs in a fresh copy under ``--work`` (of the working
tree without .git and .venv, or of a commit with ``--rev``), with mutmut in its own virtual
environment whose site-packages extends the project's (torch and s3prl are not installed twice).
mutmut runs niced (19) with one worker (``--workers N`` for more: at nice 19 they take only idle
cores). mutmut 3.8.1 stops a mutant's tests after a CPU-time limit *and* a wall-clock one (half the CPU
limit), both (estimated test time + 1 s) x ``timeout_multiplier``; at nice 19 on a busy machine the wall
clock runs out first and sound mutants count as timeouts, so the multiplier here is 60 (mutmut's default
15; ``--timeout-multiplier``): a mutant that really loops forever then takes longer to stop. Usage::

    .venv/bin/python scripts/mutation.py                       # all five modules, full runs
    .venv/bin/python scripts/mutation.py model/sparse.py       # one module
    # before/after: the suite without some test files, then only the mutants it did not kill, with them
    .venv/bin/python scripts/mutation.py model/sparse.py --rev REV --added-tests tests/test_sparse.py
    .venv/bin/python scripts/mutation.py model/sparse.py --rev REV --added-tests tests/test_sparse.py --again

``--tests-rev OLD`` makes the "before" the suite as it stood at commit OLD, run against ``--rev``'s source
(e.g. the commit where a stretch of test writing began): each of the module's test files that OLD lacks
is left out, one that has only grown since (lines added, none changed) is taken as of OLD, and one edited
since (to follow a change of the source, say) keeps ``--rev``'s content; the run prints which per file.
``--again`` then brings every file so replaced or left out in from the working tree (the "after")::

    .venv/bin/python scripts/mutation.py delta.py --rev NEW --tests-rev OLD
    .venv/bin/python scripts/mutation.py delta.py --rev NEW --tests-rev OLD --again

``--tests-from-tree`` (with ``--rev``) instead takes the module's test files from the working tree onto
``--rev``'s source: the "after" count in one fresh run (cheaper than a "before" and ``--again`` where
the old suite lets many mutants survive, since a killed mutant costs one quick test and a survivor all
of them). Each of these choices has its own copy under ``--work`` (``MODULE@REV+tests@OLD``,
``MODULE@REV+tree-tests``); ``--again``, ``--resume`` and ``--report`` take the same options to find it.

``--time-limit S`` stops a module's run after S seconds (the rest count as ``not_checked``); ``--resume``
then checks the rest, in the same copy with the same tests. ``--again --only NAME_END...`` retries just the
mutants a new test was written for. ``--tests FILE...`` runs with a subset of the module's test files (its
own copy), e.g. without tests/test_train.py, whose subprocess runs cost minutes for every survivor; its
kills are then not counted, so survivors are an upper bound. Tests that start Python processes import the
mutated package too (``PYTHONPATH``), so a mutant runs in those processes as well.

Why mutmut and not cosmic-ray: mutmut 3 records which tests reach which function and forks a
warmed-up process per mutant (forkserver isolation, safe with torch), so a mutant costs only the
tests that can see it, fastest first here (a small pytest plugin), stopping at the first failure;
cosmic-ray starts a fresh interpreter (torch import included) and the whole test command for every
mutant, which on this 2-core machine is hours instead of minutes. mutmut mutates only code inside
functions, so module constants (thresholds, environment variable names) are not among the mutants.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import site
import subprocess
import sys
from pathlib import Path

MUTMUT_VERSION = "3.8.1"
REPO = Path(__file__).resolve().parent.parent
PACKAGE = "upstream_compressed"

# module (relative to the package) -> the test files that exercise it
MODULES: dict[str, list[str]] = {
    "model/sparse.py": ["tests/test_sparse.py", "tests/test_sparse_calibration.py", "tests/test_native_spmm.py",
                        "tests/test_weight_pruning.py"],
    "model/native_spmm.py": ["tests/test_native_spmm.py"],
    "compress/selection.py": ["tests/test_selection.py", "tests/test_head_analysis.py"],
    # train/data.py (the in-memory batches) was replaced by train/stream.py (streamed batches, issue 15)
    "train/stream.py": ["tests/test_stream.py", "tests/test_train.py"],
    "delta.py": ["tests/test_delta.py", "tests/test_delta_contract.py", "tests/test_weight_pruning.py",
                 "tests/test_export.py"],
    "compress/importance.py": ["tests/test_importance.py", "tests/test_head_analysis.py"],
}

CUDA_ONLY = ("CUDA only: the 2:4 kernel; tests/test_weight_pruning.py::test_two_four_runs_on_semi_structured_kernels_on_cuda"
             " runs it where a GPU is present")

STREAM_SHUFFLE = ("equivalent: which shuffle a (seed, epoch) gets is arbitrary; the tests check what matters: the "
                  "same (seed, epoch) gives the same batches (with or without workers, on resume, after the plan's "
                  "cache dropped it), another seed or epoch gives other ones")
SELECTION_DEFAULT = 'equivalent: the default is only compared with "global", so any other value means per layer'
CRITERION_DEFAULT = 'equivalent: the default is only compared with "data_driven", so any other value means l1 (no normalising)'

# Surviving mutants that no test can kill because they change no behaviour, as
# (module, function, a fragment of the mutated line, why). Matched on the mutated code, not on
# mutmut's mutant numbers, so the list stays right when the module's other functions change; a
# fragment starting with "-" matches a line the mutant deletes (an argument left out) instead.
EXPLAINED: list[tuple[str, str, str, str]] = [
    ("model/sparse.py", "_SemiStructuredKernel.__init__", "", CUDA_ONLY),
    ("model/sparse.py", "_SemiStructuredKernel.__call__", "", CUDA_ONLY),
    ("model/sparse.py", "is_two_four", "mask.reshape(-1, 4)",
     "equivalent: the width is a multiple of 4 (checked just before), so no group of 4 straddles two rows"),
    ("model/sparse.py", "is_two_four", "mask.shape[+1]", "equivalent: masks are 2-D, so shape[1] is shape[-1]"),
    ("model/sparse.py", "_CsrKernel._multiply", "if rows.shape[1] == 0:",
     "equivalent: split and mm give the right (0, out) result for zero rows anyway (the guard is a shortcut), "
     "and a Linear with zero inputs never gets a CSR kernel (_choose: no weights, dense)"),
    ("model/sparse.py", "_multiply_chunks", "if (chunk) or True else",
     "CUDA only: chunk is None only on a GPU (forced CSR); on CPU it is always set"),
    ("model/sparse.py", "_CsrKernel.__init__", "mask.shape[0] + 1, device=None)", "CUDA only: on CPU None is the mask's device"),
    *(("model/sparse.py", "_CsrKernel.__init__", fragment, "equivalent: the matrix built here is well formed "
       "(tests/test_sparse.py::test_the_csr_matrix_built_without_invariant_checks_is_well_formed), so checking its "
       "invariants (True) only costs time; None is torch's default, off")
      for fragment in ("check_invariants=None)", "check_invariants=True)", "-check_invariants=False)")),
    *(("model/sparse.py", "MaskedLinear._choose", fragment, "CUDA only: the branch for weights on a GPU (on CPU "
       "the device test is false either way)") for fragment in (
        'if weight.device.type == "XXcudaXX":', 'if weight.device.type == "CUDA":', 'if mode != "auto":',
        'if mode == "XXautoXX":', 'if mode == "AUTO":', '            return "XXdenseXX"',  # indented 12: not the CPU ones
        '            return "DENSE"', "is_two_four(")),
    *(("model/sparse.py", "MaskedLinear._current_kernel", fragment, "CUDA only: the 2:4 branch (_choose picks "
       "semi_structured only for weights on a GPU)") for fragment in (
        'if choice == "XXsemi_structuredXX":', 'if choice == "SEMI_STRUCTURED":', "_SemiStructuredKernel(",
        "            kernel = None", "warnings.warn(None)", '            choice = None', '            choice = "XXcsrXX"',
        '            choice = "CSR"')),  # indented 12: inside that branch's try / except
    *(("model/sparse.py", "MaskedLinear.set_mask", fragment, "equivalent: copy_ into the bool mask buffer moves and "
       "casts the new mask exactly as .to(device=the buffer's, dtype=torch.bool) does")
      for fragment in ("mask.to(device=None, dtype=torch.bool)", "mask.to(device=self.mask.device, dtype=None)",
                       "mask.to(dtype=torch.bool)", "mask.to(device=self.mask.device, )")),
    *(("model/sparse.py", "MaskedLinear.from_linear", fragment, "equivalent: the meta device only saves a random "
       "initialisation that to_empty, the copies and set_mask overwrite anyway")
      for fragment in ("linear.bias is not None, device=None,", "linear.bias is not None, dtype=linear.weight.dtype)")),
    ("model/sparse.py", "_CsrKernel.__init__", '(weight.device.type == "cpu") or True else None',
     "CUDA only: on CPU the condition is true anyway"),
    ("model/sparse.py", "_CsrKernel.__init__", "mask.shape[0] + 1, ))", "CUDA only: on CPU the default is the mask's device"),
    ("compress/selection.py", "choose", "max(layers, default=-2)",
     "equivalent: only an empty layers list takes the default, and any negative one is below every layer count"),
    *(("compress/selection.py", "choose", f'step.get("selection", {default})', SELECTION_DEFAULT)
      for default in ("None", "", '"XXper_layerXX"', '"PER_LAYER"')),
    *(("compress/selection.py", "choose", f'normalize=step.get("criterion", {default})', CRITERION_DEFAULT)
      for default in ("None", "", '"XXl1XX"', '"L1"')),
    *(("delta.py", "_sparsity_summary", fragment, "the manifest's sparsity scope is prose for people (a test "
       "checks it names the biases); its wording and case are not behaviour")
      for fragment in ('"XXweights of the masked', "encoder linears listed", '"XXfront end,', '"FRONT END, THE')),
    *(("delta.py", "pack_mask", fragment, "equivalent: np.packbits without an axis packs its input flattened in "
       "row-major order anyway, so the reshape(-1) before it is redundant (reshape(None) leaves the 2-D mask, "
       "numpy takes -2 like -1)") for fragment in (".reshape(None)))", ".reshape(-2)))")),
    ("delta.py", "_sparse_tensors", 'if not name.endswith(".weight") and name not in target or',
     "equivalent: the endswith test is redundant: a name not ending in .weight is refused by the mask test "
     "anyway, since name[:-6] + 'mask' is a mask of the model only for '<a masked Linear>.weight' (a MaskedLinear's "
     "tensors are weight, bias and mask); tests/test_delta_contract.py pins the refusal of a bias listed as sparse"),
    *(("delta.py", "sha256_file", fragment, "equivalent: the read size only bounds the memory hashing takes; the "
       "digest covers every byte either way (tests/test_delta.py::test_sha256_file_hashes_files_longer_than_its_read_chunk)")
      for fragment in ("handle.read(None)", "handle.read(2 << 20)", "handle.read(1 << 21)")),
    ("delta.py", "_tensor_digest", "if (tensor.numel()) or True else",
     "equivalent: an empty tensor's bytes are b'' either way (the guard only skips the view)"),
    *(("delta.py", "make_delta", fragment, "equivalent: this model is built only to count the base's parameters; "
       "sharing the base's tensors (share=True) only saves copying them")
      for fragment in ("base.state_dict, share=None).num_parameters()", "base.state_dict, ).num_parameters()",
                       "base.state_dict, share=False).num_parameters()")),
    *(("train/stream.py", "BatchPlan._plan", f"rng = random.Random({seeding})", STREAM_SHUFFLE)
      for seeding in ("self.seed * 100_003 - epoch", "self.seed / 100_003 + epoch", "self.seed * 100004 + epoch")),
    ("train/stream.py", "BatchPlan._plan", "or batches[:2]",
     "equivalent: the fallback never runs: __init__ refuses fewer than batch_size files, so the first pool (every "
     "file, or POOL_BATCHES batches of them) always yields a full batch"),
    ("train/stream.py", "BatchPlan._cut", "if (current) or True else",
     "equivalent: a pool is never empty (a slice of range(0, n, per_pool)), so current holds its last file(s)"),
    ("train/stream.py", "BatchPlan.epoch", "if len(self._epoch_cache) >= 2:",
     "equivalent in results: a smaller cache; an epoch dropped from it is planned again identically (tested)"),
    ("train/stream.py", "BatchPlan.locate", "while self._steps_before[-1] < step:",
     "equivalent: bisect_right puts a step equal to the last known epoch start into that epoch at position 0, so "
     "growing the table one epoch later changes nothing"),
    ("train/stream.py", "collate", 'item.error or "XXXX"',
     "equivalent: an item without audio always has an error (CroppedAudio sets one wherever wav is None)"),
    ("train/stream.py", "CroppedAudio.__getitem__", "return Item(wav, None)",
     "equivalent: a decoded item's path is never read (collate names only the files that failed)"),
    ("train/stream.py", "batch_loader", "persistent_workers=None,",
     "equivalent: DataLoader reads persistent_workers as a truth value, and None is false"),
    ("train/stream.py", "batch_loader", "-persistent_workers=False,", "equivalent: False is DataLoader's default"),
    *(("train/stream.py", "warn_skipped", fragment, "flushing decides only when the warning is written, not what "
       "or where (tested)") for fragment in ("flush=None)", "flush=False)", "file=sys.stderr, )")),
    ("train/stream.py", "Batch.pin_memory", "", "CUDA only: pinning needs an accelerator (on CPU torch refuses it), "
     "and training pins its batches only on CUDA"),
    ("compress/importance.py", "_gate_hooks", "requires_grad=True, device=None)", "CUDA only: on CPU None is the model's device"),
    ("compress/importance.py", "_gate_hooks", "requires_grad=True, )", "CUDA only: on CPU the default is the model's device"),
    ("compress/importance.py", "data_driven_scores", "padded.to(None)",
     "CUDA only: on CPU the audio is already on the gates' device"),
    ("compress/importance.py", "data_driven_scores", "lengths.to(None)",
     "CUDA only: on CPU the lengths are already on the gates' device"),
    ("compress/importance.py", "data_driven_scores", "generator=generator).to(None)",
     "CUDA only: the projection is drawn on the CPU (seeded generator); there, for a float32 model, it already has "
     "the state's device and dtype"),
    ("compress/importance.py", "_gate_hooks", "return (x / gate.repeat_interleave(group),)",
     "equivalent: at gate 1, x / gate has derivative -x where x * gate has x; the score squares the gradient"),
    ("compress/importance.py", "data_driven_scores", "p.requires_grad_(True)",
     "equivalent in results: only the gates' gradients are asked for; frozen weights just save memory"),
    ("compress/importance.py", "data_driven_scores", "count = 1",
     "changes only the common scale, sqrt(n / (n + 1)) for every score: per-layer rankings and the per-layer "
     "L2-normalised global order are the same (killable only by a statistical test of the magnitude)"),
    ("compress/importance.py", "data_driven_scores", "max(count, 2)",
     "differs only where one batch is scored with one projection (count 1), and there divides every score by "
     "sqrt(2): a common scale, so per-layer rankings and the per-layer L2-normalised global order are the same"),
    *(("compress/importance.py", "data_driven_scores", fragment, "the progress bar's text and persistence, not results")
      for fragment in ("tqdm(batches, desc=None,", "leave=None)", "tqdm(batches, unit=", 'kind}", leave=False)',
                       'unit="batch", )', 'unit="XXbatchXX"', 'unit="BATCH"', "leave=True)")),
]

# mutmut's exit codes (mutmut.stats.status_by_exit_code) folded into the four reported classes
KILLED_CODES = {1, 3, 37, -11}  # -11: the tests crashed (an invalid CSR built without invariant checks)
SURVIVED_CODES = {0}
TIMEOUT_CODES = {36, 24, -24, 152, 255}


def tool_python(venv: Path) -> Path:
    """The tool venv's python, creating the venv and installing mutmut into it if missing."""
    python = venv / "bin" / "python"
    probe = [str(python), "-c", f"import mutmut, sys; sys.exit(mutmut.__version__ != {MUTMUT_VERSION!r})"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # The project's packages stay visible (a plain path line in a .pth), mutmut's own land in the venv.
    (tool_site(venv) / "project_site_packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", f"mutmut=={MUTMUT_VERSION}"], check=True)
    return python


def tool_site(venv: Path) -> Path:
    return venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


def fresh_copy(target: Path, rev: str | None) -> None:
    """The working tree without .git, .venv and build leftovers (or the committed tree of ``rev``) at ``target``."""
    shutil.rmtree(target, ignore_errors=True)
    if rev:
        target.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
        return
    top_level = {".git", ".venv", "mutants", "data", "result"}
    anywhere = shutil.ignore_patterns("__pycache__", ".pytest_cache", "*.egg-info")

    def ignore(directory: str, names: list[str]) -> set[str]:
        skipped = set(anywhere(directory, names))
        return skipped | (top_level & set(names) if Path(directory) == REPO else set())

    shutil.copytree(REPO, target, ignore=ignore)


# A pytest plugin for the mutant runs: fastest tests first (by the durations mutmut measured), so that
# with -x a killed mutant usually costs one quick test instead of whichever test its set listed first.
ORDER_PLUGIN = """
import json
from pathlib import Path


def pytest_collection_modifyitems(session, config, items):
    stats = Path("mutmut-stats.json")  # mutants/, the tests' working directory
    durations = json.loads(stats.read_text()).get("duration_by_test", {}) if stats.exists() else {}
    items.sort(key=lambda item: durations.get(item.nodeid, 0.0))
"""


LEFT_OUT = '"""Left out of this mutation run."""\n'  # an empty file keeps mutmut's config valid
REPLACED = "mutation_replaced_tests.json"  # in a copy: the test files --again brings in from the working tree


def git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True)


def take_old_test(copy: Path, test: str, tests_rev: str, rev: str | None) -> str:
    """Puts ``test`` as it was at ``tests_rev`` into ``copy`` where it has only grown since; says what it did."""
    old = git("show", f"{tests_rev}:{test}")
    if old.returncode:
        (copy / test).write_text(LEFT_OUT)
        return f"left out (not in {tests_rev})"
    numstat = git("diff", "--numstat", tests_rev, *([rev] if rev else []), "--", test).stdout.decode().split()
    if not numstat:
        return f"unchanged since {tests_rev}"
    added, deleted = numstat[:2]
    if deleted != "0":
        return f"kept at {rev or 'the working tree'} (edited since {tests_rev}: +{added} -{deleted} lines)"
    (copy / test).write_bytes(old.stdout)
    return f"as of {tests_rev} (the {added} lines added since are left out)"


TIMEOUT_MULTIPLIER = 60.0


def write_config(copy: Path, module: str, tests: list[str], timeout_multiplier: float = TIMEOUT_MULTIPLIER) -> None:
    """mutmut's [mutmut] section for one module; everything else of the repository is copied beside it."""
    (copy / "mutation_test_order.py").write_text(ORDER_PLUGIN)
    also_copy = sorted(p.name for p in copy.iterdir() if p.name not in (PACKAGE, "tests", "setup.cfg"))
    lines = [
        "[mutmut]",
        f"source_paths = {PACKAGE}",
        f"only_mutate = {PACKAGE}/{module}",
        "also_copy =", *(f"    {p}" for p in also_copy),
        "pytest_add_cli_args_test_selection =", *(f"    {t}" for t in tests),
        "pytest_add_cli_args =", "    -p", "    no:cacheprovider", "    -p", "    mutation_test_order", "    -q",
        "process_isolation = forkserver",
        "use_git_change_detection = false",
        f"timeout_multiplier = {timeout_multiplier}",
        # Without it mutmut 3.8.1's stats collection exited 1 on delta.py's suite, twice, with every test passing;
        # debug only makes it print pytest's own output.
        "debug = true",
    ]
    (copy / "setup.cfg").write_text("\n".join(lines) + "\n")


def mutant_diff(python: Path, copy: Path, name: str) -> str:
    shown = subprocess.run([str(python), "-m", "mutmut", "show", name], cwd=copy, capture_output=True, text=True)
    return shown.stdout


def explanation(module: str, name: str, diff: str) -> str | None:
    # upstream_compressed.train.stream.xǁBatchPlanǁ_plan__mutmut_7 -> BatchPlan._plan
    function = re.sub(r"__mutmut_\d+$", "", name.rsplit(".", 1)[-1])
    function = re.sub(r"^x[_ǁ]", "", function).replace("ǁ", ".")
    lines = diff.splitlines()
    added = "\n".join(line[1:] for line in lines if line.startswith("+") and not line.startswith("+++"))
    removed = "\n".join(line[1:] for line in lines if line.startswith("-") and not line.startswith("---"))
    for where, func, fragment, why in EXPLAINED:
        deleted = fragment.startswith("-") and fragment[1:] in removed and fragment[1:] not in added
        if where == module and function.endswith(func) and (deleted or fragment in added):
            return why
    return None


def run_mutmut(python: Path, copy: Path, mutants: list[str], time_limit: float | None, workers: int = 1) -> None:
    """``mutmut run`` in ``copy`` (all mutants, or only ``mutants``), niced, ``workers`` workers, output to mutmut.log.

    After ``time_limit`` seconds it is stopped; mutmut saves each verdict as it goes, so the mutants
    it had not reached count as ``not checked``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1",
           # tests that start Python processes (tests/workers, torchrun) import the package from the mutated
           # copy too: the tool venv sees the project's site-packages but not its editable install
           "PYTHONPATH": os.pathsep.join(filter(None, [str((copy / "mutants").resolve()),
                                                       os.environ.get("PYTHONPATH")]))}
    # Python caches a sys.path folder that is missing at start-up as having no modules, so mutants/ must
    # exist before mutmut starts: else a fresh run's pytest cannot import the ordering plugin mutmut copies
    # there later ("No module named 'mutation_test_order'").
    (copy / "mutants").mkdir(exist_ok=True)
    log = copy / "mutmut.log"
    with open(log, "a") as out:
        process = subprocess.Popen(["nice", "-n", "19", str(python), "-m", "mutmut", "run",
                                    "--max-children", str(workers),
                                    *mutants], cwd=copy, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            code = process.wait(timeout=time_limit)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait()
            print(f"   stopped after {time_limit:.0f} s", flush=True)
            return
        except BaseException:  # interrupted: stop mutmut and the workers it forked (its own process group)
            os.killpg(process.pid, signal.SIGTERM)
            raise
    if code != 0:
        sys.exit(f"mutmut failed in {copy} (exit {code}); see {log}")


def exit_codes_of(copy: Path, module: str) -> dict[str, int | None]:
    return json.loads((copy / "mutants" / PACKAGE / (module + ".meta")).read_text())["exit_code_by_key"]


def run_module(python: Path, work: Path, module: str, show: bool, added_tests: list[str], rev: str | None,
               again: bool, time_limit: float | None, report_only: bool = False,
               tests_rev: str | None = None, workers: int = 1, tree_tests: bool = False,
               resume: bool = False, only: list[str] | None = None,
               test_files: list[str] | None = None,
               timeout_multiplier: float = TIMEOUT_MULTIPLIER) -> dict[str, int]:
    suffix = f"+tests@{tests_rev}" if tests_rev else "+tree-tests" if tree_tests else ""
    if test_files:  # a subset of the module's test files (say, to leave out slow ones): its own copy
        suffix += "+" + "+".join(Path(t).stem for t in test_files)
    selected = test_files or MODULES[module]
    copy = work / (module.replace("/", "_").removesuffix(".py") + (f"@{rev}" if rev else "") + suffix)
    if report_only or resume:
        if not (copy / "setup.cfg").exists():
            sys.exit(f"--report and --resume need an earlier run in {copy}")
        if resume:  # mutmut keeps every verdict it reached: a plain run checks only the others
            print(f"== {module}: resumed (in {copy})", flush=True)
            run_mutmut(python, copy, [], time_limit, workers)
    elif again:
        # Same copy, same mutants, same config; only the added tests come in from the working tree. Kills
        # stand (tests are only added), every other mutant is tried again, new tests found by mutmut itself.
        if not (copy / "setup.cfg").exists():
            sys.exit(f"--again needs an earlier run in {copy}")
        replaced = json.loads((copy / REPLACED).read_text()) if (copy / REPLACED).exists() else []
        config = (copy / "setup.cfg").read_text()
        collected = config.split("pytest_add_cli_args_test_selection =")[1].split("pytest_add_cli_args =")[0].split()
        unseen = sorted(set(added_tests) - set(collected))
        if unseen:  # mutmut collects only the copy's selection, and changing it resets every verdict
            sys.exit(f"--again: {', '.join(unseen)} not among the test files of {copy} ({', '.join(collected)}), so "
                     "mutmut would never run them; give them to the first run with --added-tests (they are then "
                     "left out of it and brought in here), or count afresh with --rev REV --tests-from-tree")
        for test in sorted(set(added_tests) | set(replaced)):
            print(f"   {test}: from the working tree", flush=True)
            shutil.copy2(REPO / test, copy / test)
        retry = [name for name, code in exit_codes_of(copy, module).items() if code not in KILLED_CODES
                 and (not only or name.endswith(tuple(only)))]
        print(f"== {module}: again, {len(retry)} mutants not killed before (in {copy})", flush=True)
        if retry:
            run_mutmut(python, copy, retry, time_limit, workers)
    else:
        fresh_copy(copy, rev)
        for test in added_tests:  # the "before" count: the suite without these
            (copy / test).write_text(LEFT_OUT)
        replaced = []
        for test in selected if tests_rev else []:  # the "before" count: the suite as of tests_rev
            if test not in added_tests:
                how = take_old_test(copy, test, tests_rev, rev)
                print(f"   {test}: {how}", flush=True)
                replaced += [] if how.startswith(("unchanged", "kept")) else [test]
        for test in selected if tree_tests and rev else []:  # the "after" count in one fresh run
            shutil.copy2(REPO / test, copy / test)
            replaced.append(test)
        (copy / REPLACED).write_text(json.dumps(replaced))
        tests = [t for t in selected if (copy / t).exists()]
        if not tests:  # mutmut would fall back to the whole suite
            sys.exit(f"none of {selected} exists in {copy}")
        write_config(copy, module, tests, timeout_multiplier)
        print(f"== {module}: mutmut over {' '.join(tests)} (in {copy})", flush=True)
        run_mutmut(python, copy, [], time_limit, workers)
    exit_codes = exit_codes_of(copy, module)
    counts = {"total": len(exit_codes), "killed": 0, "survived": 0, "explained": 0, "unexplained": 0, "timeout": 0,
              "other": 0, "not_checked": 0}
    for name, exit_code in sorted(exit_codes.items()):
        if exit_code in KILLED_CODES:
            counts["killed"] += 1
        elif exit_code in TIMEOUT_CODES:
            counts["timeout"] += 1
        elif exit_code is None:  # a run stopped by --time-limit
            counts["not_checked"] += 1
        else:  # survived, or no test reaches it (33), segfault, suspicious: explained or not
            status = "survived" if exit_code in SURVIVED_CODES else "other"
            counts[status] += 1
            diff = mutant_diff(python, copy, name)
            why = explanation(module, name, diff)
            counts["explained" if why else "unexplained"] += 1
            if show or not why:
                detail = f"explained: {why}" if why else f"mutmut exit code {exit_code}"
                print(f"-- {status} ({detail}): {name}\n{diff}", flush=True)
    print(f"   {module}: " + ", ".join(f"{k} {v}" for k, v in counts.items()), flush=True)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", default=list(MODULES), help=f"any of {', '.join(MODULES)}")
    parser.add_argument("--work", type=Path, default=Path("/tmp/upstream_compressed_mutation"),
                        help="where the repository copies go (replaced)")
    parser.add_argument("--tool-venv", type=Path, default=Path("/tmp/upstream_compressed_mutmut_venv"),
                        help="virtual environment for mutmut (created if missing)")
    parser.add_argument("--added-tests", nargs="+", default=[], metavar="TEST_FILE",
                        help="test files added against survivors: left out of a fresh run (the 'before' count), "
                             "brought in from the working tree by --again (the 'after' count; also conftest.py "
                             "or helpers.py where new tests need them)")
    parser.add_argument("--rev", help="mutate and test the committed tree of this git revision instead (the "
                        "'before' count: e.g. the commit before the tests written against surviving mutants)")
    parser.add_argument("--tests-rev", metavar="OLD", help="the 'before' count: the module's test files as they were "
                        "at this revision (left out where it has none, kept where edited since rather than grown), "
                        "against the source of --rev (or the working tree); --again brings them in from the "
                        "working tree")
    parser.add_argument("--again", action="store_true",
                        help="reuse the last run's copy and retry only the mutants it did not kill, with the "
                             "--added-tests (the 'after' count of a 'before' run)")
    parser.add_argument("--tests-from-tree", action="store_true", help="with --rev: the module's test files from "
                        "the working tree on the source of --rev (the 'after' count in one fresh run)")
    parser.add_argument("--tests", nargs="+", metavar="TEST_FILE", help="run with these of the module's test files "
                        "only (its own copy; e.g. without slow subprocess tests, whose kills are then not counted)")
    parser.add_argument("--only", nargs="+", metavar="NAME_END", help="with --again: retry only the mutants whose "
                        "name ends so (e.g. data_driven_scores__mutmut_66), the ones a new test was written for")
    parser.add_argument("--resume", action="store_true",
                        help="check the mutants the last run did not reach (stopped by --time-limit or a kill)")
    parser.add_argument("--report", action="store_true", help="only count the last run's results again")
    parser.add_argument("--time-limit", type=float, help="stop each module's mutmut run after this many seconds")
    parser.add_argument("--workers", type=int, default=1, help="mutmut's worker processes (default 1)")
    parser.add_argument("--timeout-multiplier", type=float, default=TIMEOUT_MULTIPLIER,
                        help=f"mutmut's timeout_multiplier for a fresh run (default {TIMEOUT_MULTIPLIER:g}; see above)")
    parser.add_argument("--show-survivors", action="store_true", help="print explained survivors' diffs too")
    args = parser.parse_args()
    if args.tests_rev and args.tests_from_tree:
        parser.error("--tests-rev (the 'before') and --tests-from-tree (the 'after') exclude each other")
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        parser.error(f"unknown module(s) {unknown}; choose from {list(MODULES)}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so a kill also stops mutmut's process group
    python = tool_python(args.tool_venv)
    results = {module: run_module(python, args.work, module, args.show_survivors, args.added_tests, args.rev,
                                  args.again, args.time_limit, args.report, args.tests_rev, args.workers,
                                  args.tests_from_tree, args.resume, args.only, args.tests,
                                  args.timeout_multiplier)
               for module in args.modules}
    print(json.dumps({"mutmut": MUTMUT_VERSION, "rev": args.rev or "working tree", "modules": results}, sort_keys=True))
    sys.exit(1 if any(r["unexplained"] or r["not_checked"] for r in results.values()) else 0)


if __name__ == "__main__":
    main()
