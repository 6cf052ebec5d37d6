"""Data loading: ``data.num_workers`` / ``data.pin_memory`` / ``data.persistent_workers`` reach every loader the
package builds, the readers give the same batches in worker processes as in the main one (training, evaluation
and prediction give the same numbers with two workers as with none), the readers survive pickling (what a
``spawn`` worker gets) and the paired rasters of the fusion readers are read once for all their splits."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from allspark.config import Config, ConfigError, apply_overrides, from_dict, load_config, to_dict
from allspark.data import build_dataset, build_loader, loader_options, resolve_loader_options
from tests.helpers import TINY_HSI

TINY = ["model.llm.name=tiny", "model.llm.dtype=float32", "model.bridge={num_queries: 4, depth: 1, heads: 2, ff_mult: 2}"]
OVERRIDES = {
    "hsi": [*TINY_HSI, "model.llm.dtype=float32"],
    "msi": TINY,
    "table": [*TINY, "model.encoders.0.args={dim: 16, depth: 1, heads: 2, dropout: 0.0}"],
}
SHORT = ["train.epochs=1", "train.max_steps=3", "eval.baselines=[]", "train.log_with=none"]


def _with(cfg: Config, **overrides) -> Config:
    return from_dict(Config, apply_overrides(to_dict(cfg), overrides))


# -- the settings -------------------------------------------------------------------------------------------------


def test_auto_settings_follow_the_device_and_the_cores(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cpu = {"num_workers": 0, "pin_memory": False, "persistent_workers": False}
    assert resolve_loader_options("auto", "auto", "auto", "cpu") == cpu
    assert loader_options(load_config("hsi").data, "cpu") == cpu, "the config's defaults are auto"

    import allspark.data as data

    monkeypatch.setattr(data, "usable_cores", lambda: 16)
    cuda = resolve_loader_options("auto", "auto", "auto", "cuda")
    assert cuda == {"num_workers": 4, "pin_memory": True, "persistent_workers": True}
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # 8 processes share 16 cores: one worker each
    assert resolve_loader_options("auto", "auto", "auto", "cuda")["num_workers"] == 1
    monkeypatch.setattr(data, "usable_cores", lambda: 2)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert resolve_loader_options("auto", "auto", "auto", "cuda")["num_workers"] == 1
    # explicit values are obeyed; no workers means nothing to keep alive
    assert resolve_loader_options(3, False, False, "cuda") == {"num_workers": 3, "pin_memory": False,
                                                               "persistent_workers": False}
    assert resolve_loader_options(0, True, True, "cpu") == {"num_workers": 0, "pin_memory": True,
                                                            "persistent_workers": False}


@pytest.mark.parametrize("override, message", [
    ("data.num_workers=-1", "data.num_workers must be auto or a whole number >= 0, got -1"),
    ("data.num_workers=many", "data.num_workers must be auto or a whole number >= 0, got 'many'"),
    ("data.pin_memory=sometimes", "data.pin_memory must be auto, true or false, got 'sometimes'"),
    ("data.persistent_workers=2", "data.persistent_workers: expected true/false, got 2"),  # the config's typing
])
def test_a_bad_setting_fails_before_training_starts(override, message, tmp_path):
    from allspark.training import train

    with pytest.raises(ConfigError, match=message):
        train(load_config("hsi", overrides=[*OVERRIDES["hsi"], override]), tmp_path / "run")
    assert not (tmp_path / "run").exists(), "nothing written"


def test_every_training_loader_gets_the_settings(monkeypatch, tmp_path):
    """train() hands data.num_workers / pin_memory / persistent_workers to its train, validation and test loaders
    (and the data-dependent start's one pass)."""
    import allspark.run as run_module
    import allspark.training as training

    seen = []
    real = run_module.build_loader

    def spy(dataset, batch_size, **kwargs):
        seen.append((dataset.split, kwargs))
        return real(dataset, batch_size, **kwargs)

    monkeypatch.setattr(run_module, "build_loader", spy)  # the run's loaders (allspark.run.build_run)
    monkeypatch.setattr(training, "build_loader", spy)  # the data-dependent start's pass
    cfg = load_config("table", overrides=[*OVERRIDES["table"], *SHORT, "train.max_steps=1", "train.test_at_end=false",
                                          "data.num_workers=1", "data.pin_memory=false",
                                          "data.persistent_workers=false"])
    training.train(cfg, tmp_path / "run")
    splits = [split for split, _ in seen]
    assert {"train", "val", "test"} <= set(splits)
    for split, kwargs in seen:
        assert kwargs["num_workers"] == 1 and kwargs["pin_memory"] is False
        assert kwargs["persistent_workers"] is False


# -- the same numbers with workers -----------------------------------------------------------------------------------


def _gathered(cfg: Config, model, split: str) -> dict[str, np.ndarray]:
    from allspark.distributed import make_accelerator
    from allspark.evaluation import build_evaluator, collect_predictions

    dataset = build_dataset(cfg, split)
    accelerator = make_accelerator(mixed_precision="no", cpu=True)
    evaluator = build_evaluator(cfg, model.info)
    loader = accelerator.prepare(build_loader(dataset, 16, **loader_options(cfg.data, "cpu")))
    assert loader.num_workers == cfg.data.num_workers
    return collect_predictions(model, loader, accelerator, evaluator.pred_keys, evaluator.batch_keys, split)


@pytest.mark.parametrize("modality", ["hsi", "msi", "table"])
def test_evaluation_with_two_workers_equals_none(modality):
    """In-memory pixels (hsi), GeoTIFF tiles read per item (msi), table rows (table): the same predictions."""
    from allspark.model import AllSpark

    cfg = load_config(modality, overrides=OVERRIDES[modality])
    torch.manual_seed(0)
    model = AllSpark(cfg, build_dataset(cfg, "train").info())
    none = _gathered(_with(cfg, **{"data.num_workers": 0}), model, "val")
    two = _gathered(_with(cfg, **{"data.num_workers": 2}), model, "val")
    assert sorted(none) == sorted(two)
    for key in none:
        assert np.array_equal(none[key], two[key]), key
    assert len(np.unique(none["index"])) == len(build_dataset(cfg, "val")) > 16, "several batches"


@pytest.mark.parametrize("modality", ["hsi", "table"])
def test_a_training_run_with_two_workers_equals_one_without(modality, tmp_path):
    """A tiny run (3 steps, validation, test of the best weights) in the main process and with two persistent
    workers: the same best weights and the same metrics."""
    from allspark.training import train

    runs = {}
    for workers in (0, 2):
        cfg = load_config(modality, overrides=[*OVERRIDES[modality], *SHORT, f"data.num_workers={workers}",
                                               "data.persistent_workers=true"])
        torch.manual_seed(0)
        metrics = train(cfg, tmp_path / f"w{workers}")
        runs[workers] = (metrics, load_file(str(tmp_path / f"w{workers}" / "best" / "model.safetensors")))
    (m0, w0), (m2, w2) = runs[0], runs[2]
    scalar = lambda m: {k: v for k, v in m.items() if isinstance(v, (int, float)) and "seconds" not in k}
    assert scalar(m0) == scalar(m2) and len(scalar(m0)) > 3
    assert sorted(w0) == sorted(w2) and all(torch.equal(w0[k], w2[k]) for k in w0)


def test_predict_with_two_workers_equals_none(tmp_path):
    """``allspark predict --num-workers 2`` on tiles read in the workers: the rows of a run without workers."""
    import shutil

    from allspark.model import AllSpark
    from allspark.predict import predict

    cfg = load_config("msi", overrides=OVERRIDES["msi"])
    test = build_dataset(cfg, "test")
    torch.manual_seed(0)
    AllSpark(cfg, test.info()).save_pretrained(tmp_path / "ckpt")
    folder = tmp_path / "tiles"
    folder.mkdir()
    for f, _ in test.samples[:20]:
        shutil.copy(f, folder / f.name)
    rows = {}
    for workers in (0, 2):
        written = predict(tmp_path / "ckpt", [folder], tmp_path / f"w{workers}.json", device="cpu", batch_size=6,
                          num_workers=workers)
        rows[workers] = json.loads(written["predictions"].read_text())["predictions"]
    assert rows[0] == rows[2] and len(rows[0]) == 20


# -- worker safety -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("modality", ["hsi", "msi", "table", "rgb", "sar", "graph", "trajectory", "text", "hsi+sar"])
def test_readers_pickle_to_the_same_items(modality):
    """What a ``spawn`` worker (macOS, Windows) receives is the pickled reader: it must give the same items."""
    cfg = load_config(modality, overrides=["model.llm.name=tiny"])
    reader = build_dataset(cfg, "val")
    copy = pickle.loads(pickle.dumps(reader))
    assert len(copy) == len(reader)
    for i in (0, len(reader) - 1):
        a, b = reader[i], copy[i]
        assert sorted(a) == sorted(b)
        for key in a:
            if isinstance(a[key], torch.Tensor):
                assert torch.equal(a[key], b[key]), (modality, key)
            else:
                assert a[key] == b[key], (modality, key)


def test_paired_rasters_are_read_once_for_all_splits(monkeypatch, tmp_path):
    """Building the train, val, test and scene splits of a fusion scene reads its files once; the splits share
    the normalised rasters; a rewritten file is read again."""
    import shutil

    from allspark.data import demo_root
    from allspark.data.berlin import BerlinHSISAR

    root = tmp_path / "berlin"
    shutil.copytree(demo_root("berlin"), root)
    reads = []
    real = BerlinHSISAR.read_scene

    def counted(self, *args, **kwargs):
        reads.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(BerlinHSISAR, "read_scene", counted)
    splits = {s: BerlinHSISAR(root, s) for s in ("train", "val", "test", "scene")}
    assert len(reads) == 1
    images = {s: [img.data_ptr() for img in ds.images] for s, ds in splits.items()}
    assert len({tuple(v) for v in images.values()}) == 1, "one normalised copy of each raster"
    assert splits["train"].info()["preprocessing"]["sar"]["band_mean"] == \
        splits["scene"].info()["preprocessing"]["sar"]["band_mean"]

    # another fit (another validation draw) shares the files, not the normalisation
    other = BerlinHSISAR(root, "train", split_seed=1)
    assert len(reads) == 1 and other.images[0].data_ptr() != splits["train"].images[0].data_ptr()

    import scipy.io

    sar = scipy.io.loadmat(root / "data_SAR_HR.mat")["data_SAR_HR"] * 2.0  # the SAR file rewritten
    scipy.io.savemat(root / "data_SAR_HR.mat", {"data_SAR_HR": sar})
    again = BerlinHSISAR(root, "train")
    assert len(reads) == 2
    assert again.info()["preprocessing"]["sar"]["band_mean"] == pytest.approx(
        [2 * m for m in splits["train"].info()["preprocessing"]["sar"]["band_mean"]])

    from allspark.data import paired_raster

    rasters = next(reversed(paired_raster._SCENES.values()))["read"][0]
    with pytest.raises(ValueError, match="read-only"):  # shared by the splits: nothing may change it in place
        rasters[1][0, 0, 0] = 1.0


def test_a_resume_may_load_the_data_differently(tmp_path):
    """A run resumed on another machine (or started before these keys, with ``num_workers: 0`` saved) may change
    the data loading; anything else that differs is still refused."""
    from allspark.config import save_config
    from allspark.errors import UserError
    from allspark.training import _check_resume_config

    old = load_config("hsi", overrides=[*OVERRIDES["hsi"], "data.num_workers=0", "data.pin_memory=false"])
    save_config(old, tmp_path / "config.yaml")
    ckpt = tmp_path / "checkpoints" / "step-4"
    _check_resume_config(load_config("hsi", overrides=[*OVERRIDES["hsi"], "data.persistent_workers=false"]), ckpt)
    with pytest.raises(UserError, match=r"in 1 key\(s\): train.lr .*may change on resume \(and the data loading, "
                                        r"data.num_workers, data.pin_memory, data.persistent_workers\)"):
        _check_resume_config(load_config("hsi", overrides=[*OVERRIDES["hsi"], "train.lr=0.5"]), ckpt)
