"""The trade-off report: an experiment folder written in its documented JSON layout -> table, CSV, JSON, plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from upstream_compressed.cli import main
from upstream_compressed.report import PLOTS, ReportError, figures, load_report

G = 10**9


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def add_model(expdir: Path, model: str, method: str, rate: float | None, profile: dict | None = None) -> None:
    write_json(expdir / "models" / model / "model.json",
               {"model": model, "method": method, "rate": rate, "upstream": f"hubert_{method}",
                "ckpt": None if rate is None else f"{model}.safetensors", "recipe": None})
    if profile is not None:
        write_json(expdir / "models" / model / "profile.json",
                   {"params_encoder": profile["params"] // 2, "seconds_audio": 10.0, "device": "cpu",
                    "peak_memory": 1, **profile})


def add_result(expdir: Path, task: str, model: str, test: float, lr: float) -> None:
    write_json(expdir / "downstream" / f"{task.lower()}_{model}" / "result.json",
               {"task": task, "model": model, "metric": {"PR": "per", "SID": "acc"}[task], "test": test,
                "dev_best": test, "lr": lr, "steps": 200, "train_seconds": 12.5})


def profile(params: int, macs: int, seconds: float, effective: int | None = None) -> dict:
    return {"params": params, "macs": macs, "macs_effective": effective or macs, "median_seconds": seconds,
            "rtf": seconds / 10.0}


@pytest.fixture
def expdir(tmp_path) -> Path:
    """Base, head pruning at two rates, 90% weight pruning, low rank not yet profiled; SID for some only."""
    root = tmp_path / "exp"
    add_model(root, "hubert", "base", None, profile(94_680_000, 69_500_000_000, 1.2))
    add_model(root, "h_half", "head_pruning", 0.5, profile(80_500_000, 60_100_000_000, 0.9))
    add_model(root, "h_quarter", "head_pruning", 0.25, profile(87_600_000, 64_800_000_000, 1.05))
    add_model(root, "sparse90", "weight_pruning", 0.9, profile(94_680_000, 69_500_000_000, 0.812, 8_123_000_000))
    add_model(root, "lowrank50", "low_rank", 0.5)
    add_result(root, "PR", "hubert", 0.0541, 1e-4)
    add_result(root, "SID", "hubert", 0.8142, 1e-2)
    add_result(root, "PR", "h_half", 0.07129, 1e-4)
    add_result(root, "PR", "h_quarter", 0.0612, 1e-4)
    add_result(root, "SID", "h_quarter", 0.7655, 1e-2)
    add_result(root, "PR", "sparse90", 0.1, 1e-4)
    add_result(root, "PR", "lowrank50", 0.08, 1e-4)
    (root / "downstream" / "sid_h_half").mkdir()  # training still running: no result.json yet
    return root


TABLE = """\
| method | rate | model | params (M) | MACs (G / 10 s) | eff. MACs (G / 10 s) | RTF (cpu) | PER % | SID acc % | SID lr |
|---|---|---|---:|---:|---:|---:|---:|---:|---:|
| base | - | hubert | 94.68 | 69.50 | 69.50 | 0.120 | 5.41 | 81.42 | 0.01 |
| head_pruning | 0.25 | h_quarter | 87.60 | 64.80 | 64.80 | 0.105 | 6.12 | 76.55 | 0.01 |
| head_pruning | 0.5 | h_half | 80.50 | 60.10 | 60.10 | 0.0900 | 7.13 | - | - |
| low_rank | 0.5 | lowrank50 | - | - | - | - | 8.00 | - | - |
| weight_pruning | 0.9 | sparse90 | 94.68 | 69.50 | 8.12 | 0.0812 | 10.00 | - | - |
"""

CSV = """\
method,rate,model,params (M),MACs (G / 10 s),eff. MACs (G / 10 s),RTF (cpu),PER %,SID acc %,SID lr,PER 95% low,PER 95% high,SID acc 95% low,SID acc 95% high
base,,hubert,94.68,69.50,69.50,0.120,5.41,81.42,0.01,,,,
head_pruning,0.25,h_quarter,87.60,64.80,64.80,0.105,6.12,76.55,0.01,,,,
head_pruning,0.5,h_half,80.50,60.10,60.10,0.0900,7.13,,,,,,
low_rank,0.5,lowrank50,,,,,8.00,,,,,,
weight_pruning,0.9,sparse90,94.68,69.50,8.12,0.0812,10.00,,,,,,
"""


def test_cli_writes_table_csv_json_and_pngs(expdir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["report", str(expdir), "-o", str(out)]) == 0
    printed = capsys.readouterr()
    assert printed.out.startswith(TABLE)
    assert printed.err == ""

    markdown = (out / "report.md").read_text()
    assert TABLE in markdown
    assert "eff. MACs count only multiplications by non-zero weights (equal to MACs for models without" in markdown
    for name in PLOTS:
        assert f"]({name}.png)" in markdown
    assert (out / "report.csv").read_text() == CSV

    merged = json.loads((expdir / "report.json").read_text())
    assert merged["seconds_audio"] == 10.0
    assert [row["model"] for row in merged["rows"]] == ["hubert", "h_quarter", "h_half", "lowrank50", "sparse90"]
    h_quarter = merged["rows"][1]
    assert (h_quarter["method"], h_quarter["rate"], h_quarter["ckpt"]) == ("head_pruning", 0.25, "h_quarter.safetensors")
    assert h_quarter["profile"]["peak_memory"] == 1  # the profile's extra fields are kept
    assert h_quarter["SID"]["lr"] == 0.01 and h_quarter["PR"]["test"] == 0.0612
    assert merged["rows"][2]["SID"] is None and merged["rows"][3]["profile"] is None
    assert not (out / "report.json").exists()

    for name in PLOTS:
        data = (out / f"{name}.png").read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        with Image.open(out / f"{name}.png") as image:
            image.verify()
        with Image.open(out / f"{name}.png") as image:
            assert image.format == "PNG" and image.size == (840, 600)


def test_default_outdir_is_expdir(expdir, capsys):
    assert main(["report", str(expdir)]) == 0
    assert {p.name for p in expdir.iterdir()} >= {"report.md", "report.csv", "report.json", *(f"{n}.png" for n in PLOTS)}


def lines_by_label(figure) -> dict[str, list[float]]:
    """Each line's points as one flat list x0, y0, x1, y1, ... (what pytest.approx compares)."""
    (axes,) = figure.axes
    return {line.get_label(): [float(v) for xy in line.get_xydata() for v in xy] for line in axes.get_lines()}


def test_plots_have_one_line_per_technique_and_the_base(expdir):
    plots = figures(load_report(expdir))
    assert set(plots) == set(PLOTS)

    per = lines_by_label(plots["per_vs_macs"])  # low_rank has no profile, so no line
    assert set(per) == {"head_pruning", "weight_pruning", "base (hubert)"}
    assert per["head_pruning"] == pytest.approx([60.1, 7.129, 64.8, 6.12])  # sorted by MACs
    assert per["weight_pruning"] == pytest.approx([8.123, 10.0])  # effective, not dense, MACs
    assert per["base (hubert)"] == pytest.approx([69.5, 5.41])

    acc = lines_by_label(plots["acc_vs_macs"])
    assert set(acc) == {"head_pruning", "base (hubert)"}
    assert acc["head_pruning"] == pytest.approx([64.8, 76.55])
    assert "lr 0.01" in plots["acc_vs_macs"].axes[0].get_ylabel()

    seconds = lines_by_label(plots["per_vs_seconds"])
    assert seconds["head_pruning"] == pytest.approx([0.9, 7.129, 1.05, 6.12])
    assert seconds["base (hubert)"] == pytest.approx([1.2, 5.41])
    assert "(cpu)" in plots["per_vs_seconds"].axes[0].get_xlabel()
    assert "equal to dense MACs" in plots["per_vs_macs"].axes[0].get_xlabel()


def test_models_without_profiles_or_results_still_get_rows(tmp_path, capsys):
    root = tmp_path / "exp"
    add_model(root, "hubert", "base", None)
    add_model(root, "kd", "distillation", 0.75)
    (root / "models" / "half_written").mkdir()  # no model.json
    add_result(root, "PR", "gone", 0.2, 1e-4)  # a result whose model folder is missing
    assert main(["report", str(root)]) == 0
    printed = capsys.readouterr()
    assert "| base | - | hubert | - | - | - | - | - | - | - |" in printed.out
    assert "| distillation | 0.75 | kd | - | - | - | - | - | - | - |" in printed.out
    assert "MACs (G) | eff. MACs (G) | RTF |" in printed.out  # no profile: no audio length or device to state
    assert "skipped" in printed.err and "half_written: no model.json" in printed.err
    assert "no models/gone/model.json" in printed.err
    for name in PLOTS:
        (axes,) = figures(load_report(root))[name].axes
        assert len(axes.get_lines()) == 0 and "yet" in axes.texts[0].get_text()
        assert (root / f"{name}.png").read_bytes().startswith(b"\x89PNG")


def test_mixed_devices_name_the_device_in_each_rtf_cell(tmp_path):
    root = tmp_path / "exp"
    add_model(root, "hubert", "base", None, profile(1_000, 2 * G, 0.5))
    add_model(root, "h50", "head_pruning", 0.5, {**profile(500, G, 0.01), "device": "cuda"})
    assert main(["report", str(root)]) == 0
    table = (root / "report.csv").read_text().splitlines()
    assert table[0].split(",")[6] == "RTF"
    assert table[1].split(",")[3:7] == ["0.00100", "2.00", "2.00", "0.0500 (cpu)"]
    assert table[2].split(",")[6] == "0.00100 (cuda)"


def test_missing_or_empty_experiment_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "exp" / "downstream").mkdir(parents=True)
    assert main(["report", str(tmp_path / "exp")]) == 2
    assert "has no models/ folder" in capsys.readouterr().err
    (tmp_path / "exp" / "models" / "x").mkdir(parents=True)
    with pytest.raises(ReportError, match="no model folder with a model.json"):
        load_report(tmp_path / "exp")


@pytest.mark.parametrize("damage, message", [
    (lambda r: add_result(r, "PR", "hubert", 5.41, 1e-4), "fractions"),
    (lambda r: write_json(r / "downstream" / "pr_hubert" / "result.json",
                          {"task": "PR", "model": "hubert", "metric": "acc", "test": 0.1, "lr": 1e-4}), "PR with per"),
    (lambda r: write_json(r / "downstream" / "sid_other" / "result.json",
                          {"task": "PR", "model": "hubert", "metric": "per", "test": 0.1, "lr": 1e-4}),
     "should be pr_hubert"),
    (lambda r: add_model(r, "h50", "head_pruning", 0.5, profile(1_000, G, 0.5) | {"seconds_audio": 5.0}),
     "different audio lengths"),
    (lambda r: write_json(r / "models" / "h50" / "model.json", {"model": "h25", "method": "head_pruning"}),
     "differs from its folder name"),
    (lambda r: add_model(r, "h50", "head_pruning", 50), "fraction removed"),
    (lambda r: write_json(r / "models" / "hubert" / "profile.json", {"params": 1}), "field 'macs'"),
    (lambda r: (r / "models" / "hubert" / "profile.json").write_text("{"), "not readable JSON"),
    (lambda r: write_json(r / "models" / "hubert" / "profile.json", profile(1_000, G, float("nan"))),
     "NaN is not a JSON number"),
])
def test_bad_files_are_named_in_the_error(tmp_path, capsys, damage, message):
    root = tmp_path / "exp"
    add_model(root, "hubert", "base", None, profile(1_000, G, 0.5))
    add_result(root, "PR", "hubert", 0.1, 1e-4)
    damage(root)
    assert main(["report", str(root)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(root) in err


def test_time_beside_the_base_gets_its_column_and_quartiles(expdir, tmp_path):
    for model, ratio in (("hubert", 1.0), ("h_half", 0.81)):
        path = expdir / "models" / model / "profile.json"
        data = json.loads(path.read_text())
        path.write_text(json.dumps({**data, "time_ratio_to_base": ratio, "time_ratio_iqr": [ratio - 0.02, ratio + 0.03]}))
    report = load_report(expdir)
    from upstream_compressed.report import csv_table, markdown_table

    lines = markdown_table(report).splitlines()
    assert "| RTF (cpu) | time / base | PER %" in lines[0]
    half = next(line for line in lines if "| h_half |" in line)
    assert "| 0.810 (0.790-0.840) |" in half
    quarter = next(line for line in lines if "| h_quarter |" in line)  # profiled, not timed beside the base
    assert "| 0.105 | - |" in quarter
    rows = {r.split(",")[2]: r.split(",") for r in csv_table(report).splitlines()}
    header = rows["model"]
    assert header[7] == "time / base" and header[-2:] == ["time / base q25", "time / base q75"]
    assert rows["h_half"][7] == "0.810" and rows["h_half"][-2:] == ["0.790", "0.840"]
    assert rows["h_quarter"][7] == "" and rows["h_quarter"][-2:] == ["", ""]


def test_a_time_ratio_without_its_quartiles_is_refused(expdir):
    path = expdir / "models" / "h_half" / "profile.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "time_ratio_to_base": 0.8, "time_ratio_iqr": [0.7]}))
    with pytest.raises(ReportError, match="time_ratio_iqr is \\[0.7\\]"):
        load_report(expdir)
