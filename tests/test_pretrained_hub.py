"""Loading a checkpoint by Hugging Face Hub id: ``AllSpark.from_pretrained("namespace/name[@revision]")``,
``allspark predict --checkpoint namespace/name``, ``evaluate.py --checkpoint namespace/name``, and the config
overrides of ``from_pretrained`` (``**{"model.llm.name": ...}``).

There is no network here: ``huggingface_hub.snapshot_download`` is replaced by a recorder that copies a tiny
checkpoint saved in this test into a folder of its own (what the real call does with the Hub's files) or raises
the error huggingface_hub raises for a missing repository or no network. An existing local folder never reaches
it, whatever its name looks like."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from allspark.config import ConfigError, load_config
from allspark.errors import UserError, UserFileNotFoundError
from tests.helpers import TINY_HSI

REPO = "someone/allspark-hsi"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny HSI checkpoint with every trainable tensor (LoRA B included) non-zero, and a test batch."""
    from allspark.data import build_dataset
    from allspark.model import AllSpark

    cfg = load_config("hsi", overrides=[*TINY_HSI, "model.llm.dtype=float32"])
    train = build_dataset(cfg, "train")
    torch.manual_seed(0)
    model = AllSpark(cfg, train.info())
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    folder = tmp_path_factory.mktemp("hub-source") / "ckpt"
    model.save_pretrained(folder)
    test = build_dataset(cfg, "test")
    batch = {**test.collate([test[i] for i in range(6)]), "prompt_index": torch.zeros(6, dtype=torch.long)}
    model.eval()
    with torch.no_grad():
        logits = model(batch).predictions["logits"]
    return SimpleNamespace(folder=folder, batch=batch, logits=logits, cfg=cfg)


class FakeHub:
    """``snapshot_download`` as huggingface_hub has it, over a dict of repository id -> folder to serve."""

    def __init__(self, root: Path, repos: dict[str, Path]):
        self.root, self.repos, self.calls = root, repos, []
        self.error: BaseException | None = None

    def __call__(self, repo_id, *, revision=None, **kwargs):
        self.calls.append({"repo_id": repo_id, "revision": revision, **kwargs})
        if self.error is not None:
            raise self.error
        if repo_id not in self.repos:
            from huggingface_hub.errors import RepositoryNotFoundError

            raise RepositoryNotFoundError(f"404 Client Error. Repository Not Found for url: "
                                          f"https://huggingface.co/api/models/{repo_id}/revision/main.",
                                          response=SimpleNamespace(headers={}, status_code=404, request=None))
        target = self.root / repo_id.replace("/", "--") / (revision or "main")
        if not target.exists():
            shutil.copytree(self.repos[repo_id], target)
        return str(target)


@pytest.fixture
def hub(saved, tmp_path, monkeypatch):
    import huggingface_hub

    fake = FakeHub(tmp_path / "hf-cache", {REPO: saved.folder})
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    return fake


def _logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(batch).predictions["logits"]


def _edit_config(folder: Path, **llm) -> None:
    data = yaml.safe_load((folder / "config.yaml").read_text())
    data["model"]["llm"].update(llm)
    (folder / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


# -- from_pretrained("namespace/name") --------------------------------------------------------------------------------

def test_a_hub_id_is_downloaded_and_loads_the_same_model(saved, hub):
    from allspark.model import AllSpark

    model = AllSpark.from_pretrained(REPO)
    assert [(c["repo_id"], c["revision"], c["library_name"]) for c in hub.calls] == [(REPO, None, "allspark")]
    assert torch.equal(_logits(model, saved.batch), saved.logits)
    assert model.cfg.model.llm.trust_remote_code is False


def test_a_revision_after_at_or_as_an_argument_reaches_the_download(saved, hub):
    from allspark.model import AllSpark

    AllSpark.from_pretrained(f"{REPO}@v1.0")
    AllSpark.from_pretrained(REPO, revision="refs/pr/2")
    AllSpark.from_pretrained(f"{REPO}@abc123", revision="abc123")  # the same revision twice
    assert [c["revision"] for c in hub.calls] == ["v1.0", "refs/pr/2", "abc123"]
    with pytest.raises(ConfigError, match=r"names revision 'v1.0', but revision='v2' was passed too"):
        AllSpark.from_pretrained(f"{REPO}@v1.0", revision="v2")
    with pytest.raises(ConfigError, match=r"revision='v1' applies to a Hugging Face Hub id; .* is a local folder"):
        AllSpark.from_pretrained(saved.folder, revision="v1")
    assert len(hub.calls) == 3, "refused before any download"


def test_an_existing_local_folder_is_never_downloaded_even_if_named_like_a_hub_id(saved, hub, tmp_path, monkeypatch):
    from allspark.model import AllSpark

    shutil.copytree(saved.folder, tmp_path / "someone" / "allspark-hsi")
    monkeypatch.chdir(tmp_path)
    model = AllSpark.from_pretrained(REPO)  # the relative folder ./someone/allspark-hsi
    assert hub.calls == []
    assert torch.equal(_logits(model, saved.batch), saved.logits)


@pytest.mark.parametrize("name", ["./runs/nowhere", "/no/such/checkpoint", "runs/a/best", "best", "runs/my run",
                                  "~/no-such-allspark-run/x"])
def test_a_missing_path_that_is_no_hub_id_is_not_found_without_network(hub, name):
    from allspark.model import AllSpark

    with pytest.raises(UserFileNotFoundError) as err:
        AllSpark.from_pretrained(name)
    assert str(err.value).startswith(f"checkpoint {name} does not exist: expected a local folder")
    assert "Hugging Face Hub model id 'namespace/name'" in str(err.value)
    assert hub.calls == []


def test_a_missing_repository_or_no_network_is_one_hub_error(hub):
    from huggingface_hub.errors import LocalEntryNotFoundError

    from allspark.hub import HubError
    from allspark.model import AllSpark

    with pytest.raises(HubError) as err:
        AllSpark.from_pretrained("someone/missing@v3")
    message = str(err.value)
    assert message.startswith("someone/missing@v3: no local folder of that name, and downloading it as a Hugging "
                              "Face Hub model repository failed: RepositoryNotFoundError: 404 Client Error")
    assert "HF_TOKEN" in message and "./someone/missing@v3" in message
    hub.error = LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder for the specified "
                                        "revision on the local disk and outgoing traffic has been disabled.")
    with pytest.raises(HubError, match=rf"^{REPO}: no local folder .* failed: LocalEntryNotFoundError: Cannot find"):
        AllSpark.from_pretrained(REPO)
    assert isinstance(err.value, UserError)


def test_without_huggingface_hub_a_hub_id_says_how_to_install_it(monkeypatch):
    import sys

    from allspark.errors import MissingPackageError
    from allspark.model import AllSpark

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(MissingPackageError, match=rf"loading the checkpoint '{REPO}' from the Hugging Face Hub "
                                                  r"needs the huggingface_hub package.*pip install huggingface_hub"):
        AllSpark.from_pretrained(REPO)


def test_a_hub_repository_that_is_no_checkpoint_says_so(saved, hub, tmp_path):
    from allspark.model import AllSpark

    other = tmp_path / "other"
    shutil.copytree(saved.folder, other)
    (other / "model.safetensors").unlink()
    hub.repos["someone/other"] = other
    with pytest.raises(UserFileNotFoundError, match=r"^someone/other \(downloaded to .*\) is not an AllSpark "
                                                    r"checkpoint: model.safetensors is missing"):
        AllSpark.from_pretrained("someone/other")


def test_a_downloaded_config_cannot_turn_on_remote_code_or_an_llm_download(saved, hub, tmp_path, monkeypatch, caplog):
    import allspark.llm as llm_module
    from allspark.model import AllSpark

    remote = tmp_path / "remote"
    shutil.copytree(saved.folder, remote)
    _edit_config(remote, trust_remote_code=True)
    hub.repos["someone/remote"] = remote
    with caplog.at_level("WARNING", logger="allspark.model"):
        assert AllSpark.from_pretrained("someone/remote").cfg.model.llm.trust_remote_code is False
    assert "(Hub checkpoint someone/remote) sets model.llm.trust_remote_code: true; loading with it off" in caplog.text

    fetching = tmp_path / "fetching"
    shutil.copytree(saved.folder, fetching)
    _edit_config(fetching, name="otherorg/big-llm")
    hub.repos["someone/fetching"] = fetching
    loads = []
    monkeypatch.setattr(llm_module, "_load_pretrained", lambda *a, **kw: loads.append(a) or 1 / 0)
    with pytest.raises(UserError, match=r"\(Hub checkpoint someone/fetching\): model.llm.name is 'otherorg/big-llm', "
                                        r"a Hugging Face hub id"):
        AllSpark.from_pretrained("someone/fetching")
    assert loads == []


# -- overrides ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llm_folder(tmp_path_factory) -> Path:
    """The tiny LLM's base weights and tokenizer written as a transformers folder (what `model.llm.name` may name)."""
    from allspark.config import AdapterConfig, LLMConfig
    from allspark.llm import load_llm

    base = load_llm(LLMConfig(name="tiny", dtype="float32", adapter=AdapterConfig(type="none")))
    folder = tmp_path_factory.mktemp("llm") / "tiny-llm"
    base.model.save_pretrained(folder)
    base.tokenizer.save_pretrained(folder)
    return folder


def test_an_override_re_points_a_moved_llm_and_the_model_is_the_same(saved, hub, llm_folder, tmp_path):
    from allspark.model import AllSpark

    moved = tmp_path / "moved"
    shutil.copytree(saved.folder, moved)
    _edit_config(moved, name=str(tmp_path / "gone" / "llm"))  # the checkpoint's LLM folder is no longer there
    with pytest.raises(UserFileNotFoundError, match="no such model folder"):
        AllSpark.from_pretrained(moved)
    model = AllSpark.from_pretrained(moved, **{"model.llm.name": str(llm_folder)})
    assert model.cfg.model.llm.name == str(llm_folder) and model._llm.source == str(llm_folder)
    assert torch.allclose(_logits(model, saved.batch), saved.logits, atol=1e-5)
    # the section form, on a downloaded checkpoint
    again = AllSpark.from_pretrained(REPO, **{"model.llm": {"name": str(llm_folder), "dtype": "float32"}})
    assert again._llm.source == str(llm_folder)
    assert torch.allclose(_logits(again, saved.batch), saved.logits, atol=1e-5)


def test_an_llm_hub_id_the_caller_names_as_an_override_may_download(saved, monkeypatch):
    import allspark.llm as llm_module
    from allspark.model import AllSpark

    class Loaded(Exception):
        pass

    calls = []

    def fake_load(name, dtype, trust_remote_code, **quantized):
        calls.append((name, trust_remote_code))
        raise Loaded

    monkeypatch.setattr(llm_module, "_load_pretrained", fake_load)
    with pytest.raises(Loaded):
        AllSpark.from_pretrained(saved.folder, **{"model.llm.name": "otherorg/big-llm"})
    assert calls == [("otherorg/big-llm", False)]


def test_bad_overrides_are_one_clear_config_error(saved):
    from allspark.model import AllSpark

    with pytest.raises(ConfigError, match=r"unknown config key 'model.llm.nme'.*did you mean 'model.llm.name'"):
        AllSpark.from_pretrained(saved.folder, **{"model.llm.nme": "x"})
    with pytest.raises(ConfigError, match=r"model.llm.trust_remote_code cannot be given as an override; pass "
                                          r"trust_remote_code=True"):
        AllSpark.from_pretrained(saved.folder, **{"model.llm.trust_remote_code": True})
    with pytest.raises(ConfigError, match=r"cannot be given as an override"):
        AllSpark.from_pretrained(saved.folder, **{"model.llm": {"trust_remote_code": True}})
    with pytest.raises(ConfigError, match=r"with the overrides \['model.bridge.num_queries'\], checkpoint tensor "
                                          r"bridge.*shape"):
        AllSpark.from_pretrained(saved.folder, **{"model.bridge.num_queries": 6})


# -- export folders, on the Hub or moved -------------------------------------------------------------------------------

def test_an_exported_repository_loads_its_parts_on_the_llm_beside_them(saved, hub, tmp_path):
    from allspark.model import AllSpark, export_checkpoint

    out = export_checkpoint(saved.folder, tmp_path / "export")
    direct = _logits(AllSpark.from_pretrained(out / "allspark"), saved.batch)
    assert torch.allclose(direct, saved.logits, atol=1e-5)
    moved = tmp_path / "moved-export"
    out.rename(moved)  # the export's config names `out`, which is gone now
    hub.repos["someone/exported"] = moved
    downloaded = AllSpark.from_pretrained("someone/exported")
    (call,) = hub.calls
    snapshot = Path(hub.root / "someone--exported" / "main")
    assert call["repo_id"] == "someone/exported" and downloaded.cfg.model.llm.name == str(snapshot.resolve())
    assert torch.allclose(_logits(downloaded, saved.batch), direct, atol=1e-6)
    local = AllSpark.from_pretrained(moved)  # the export folder itself, moved: the same
    assert local.cfg.model.llm.name == str(moved.resolve())
    assert torch.allclose(_logits(local, saved.batch), direct, atol=1e-6)


# -- predict and evaluate ------------------------------------------------------------------------------------------

def test_predict_and_evaluate_take_a_hub_id(saved, hub, tmp_path):
    import scipy.io
    import tifffile

    from allspark.data import resolve_data_root
    from allspark.evaluate_run import evaluate_checkpoint
    from allspark.predict import predict

    cube = scipy.io.loadmat(resolve_data_root(saved.cfg) / "PaviaU.mat")["paviaU"]
    tif = tmp_path / "scene.tif"
    tifffile.imwrite(tif, cube, photometric="minisblack", planarconfig="contig")
    local = predict(saved.folder, [tif], tmp_path / "local")
    remote = predict(REPO, [tif], tmp_path / "remote")
    assert [c["repo_id"] for c in hub.calls] == [REPO]
    assert np.array_equal(tifffile.imread(remote["map"]), tifffile.imread(local["map"]))

    with pytest.raises(UserError, match=rf"--checkpoint {REPO} is a Hugging Face Hub id: pass --output-dir"):
        evaluate_checkpoint(REPO, modality="hsi")
    assert len(hub.calls) == 1, "refused before the download"
    expected = evaluate_checkpoint(saved.folder, modality="hsi", output_dir=tmp_path / "eval-local")
    got = evaluate_checkpoint(REPO, modality="hsi", output_dir=tmp_path / "eval-remote")
    assert got["OA"] == expected["OA"] and got["kappa"] == expected["kappa"]
    assert json.loads((tmp_path / "eval-remote" / "metrics.json").read_text())["OA"] == expected["OA"]
    snapshot = hub.root / REPO.replace("/", "--") / "main"
    assert not (snapshot / "README.md").exists(), "no model card written into the download"
    assert not (snapshot / "eval").exists()


def test_predict_cli_with_a_failed_download_is_one_error_line(hub, tmp_path, capsys):
    from allspark.cli import predict_main, run_cli

    (tmp_path / "in").mkdir()
    with pytest.raises(SystemExit) as exited:
        run_cli(lambda: predict_main(["--checkpoint", "someone/missing", "--input", str(tmp_path / "in"),
                                      "--out", str(tmp_path / "out")]))
    assert exited.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: someone/missing: no local folder of that name, and downloading it")
    assert not (tmp_path / "out").exists()


def test_hub_ids_look_like_hub_ids():
    from huggingface_hub.utils import validate_repo_id

    from allspark.hub import parse_hub_id

    good = {"org/name": ("org/name", None), "org/name@v1.0": ("org/name", "v1.0"),
            "Org_1/Model-2.5@refs/pr/1": ("Org_1/Model-2.5", "refs/pr/1")}
    for text, expected in good.items():
        assert parse_hub_id(text) == expected
        validate_repo_id(expected[0])
    for text in ("name", "./org/name", "/org/name", "~/org", "a/b/c", "org/na me", "org/-x", "org/x..y", "a--b/c",
                 "org/name@", "org/", "org\\name"):
        assert parse_hub_id(text) is None, text
