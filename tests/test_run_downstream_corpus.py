"""``run_downstream.sh --corpus DIR``: the corpus reaches the recipes, and data/embedded_corpus is left alone.

The script runs for real (a copy in a scratch checkout folder, so its ``data/`` is the test's), on a
plan of one data-driven compression whose audio is ``${CORPUS}/audio``, with only the profile stage
(it makes the model, then profiles it: no downstream training).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from upstream_compressed.delta import read_delta

SCRIPT = Path(__file__).resolve().parents[1] / "run_downstream.sh"


@pytest.mark.parametrize("existing", ["real folder", "link elsewhere"])
def test_corpus_option_leaves_data_embedded_corpus_alone(tmp_path, hubert_ckpt, audio_dir, existing):
    checkout = tmp_path / "checkout"
    (checkout / "data").mkdir(parents=True)
    shutil.copy(SCRIPT, checkout / "run_downstream.sh")
    embedded = checkout / "data" / "embedded_corpus"
    old_corpus = tmp_path / "old_corpus"
    old_corpus.mkdir()
    (old_corpus / "keep.txt").write_text("the user's files")
    if existing == "real folder":  # what `make-corpus data/embedded_corpus` leaves
        shutil.copytree(old_corpus, embedded)
    else:
        embedded.symlink_to(old_corpus)

    corpus = tmp_path / "new_corpus"
    shutil.copytree(audio_dir, corpus / "audio")
    recipe = tmp_path / "heads.yaml"
    recipe.write_text(yaml.safe_dump({"base": str(hubert_ckpt), "steps": [
        {"method": "head_pruning", "ratio": 0.5, "criterion": "data_driven", "audio": "${CORPUS}/audio",
         "max_utterances": 4}]}))
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"corpus": "${CORPUS}", "base": str(hubert_ckpt),
                                    "pr_config": "ctc_libriphone_quick", "sid_config": "voxceleb1_quick",
                                    "models": [{"name": "heads", "method": "head_pruning", "rate": 0.5,
                                                "recipe": str(recipe), "upstream": "hubert_headpruned"}]}))
    expdir = tmp_path / "exp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("CORPUS", None)
    result = subprocess.run(["bash", str(checkout / "run_downstream.sh"), "--plan", str(plan), "--expdir", str(expdir),
                             "--corpus", str(corpus), "--stages", "profile", "--profile-seconds", "0.5"],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]

    delta = read_delta(expdir / "models" / "heads" / "delta.safetensors")
    assert delta.manifest["recipe"]["steps"][0]["audio"] == str(corpus / "audio")  # scored on --corpus
    if existing == "real folder":
        assert not embedded.is_symlink()
        assert sorted(p.name for p in embedded.iterdir()) == ["keep.txt"]  # no link dropped inside it
    else:
        assert embedded.is_symlink() and embedded.resolve() == old_corpus.resolve()
    assert (old_corpus / "keep.txt").read_text() == "the user's files"
