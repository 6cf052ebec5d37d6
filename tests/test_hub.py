"""Pushing to the Hugging Face Hub: ``allspark export --push-to-hub REPO_ID`` and ``AllSpark.push_to_hub``.

There is no network here: ``huggingface_hub.create_repo`` and ``upload_folder`` are replaced by recorders that
look at the folder while it is uploaded. A missing huggingface_hub, a malformed repository id and a failed upload
are one clear error each, the first two before the export does any work."""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from allspark.config import load_config
from allspark.errors import MissingPackageError, UserError
from tests.helpers import TINY_HSI


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from allspark.data import build_dataset
    from allspark.model import AllSpark

    cfg = load_config("hsi", overrides=[*TINY_HSI, "model.llm.dtype=float32"])
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("hub") / "ckpt"
    AllSpark(cfg, build_dataset(cfg, "train").info()).save_pretrained(folder)
    (folder / "README.md").write_text("# model card\n")
    return folder


@pytest.fixture
def hub(monkeypatch):
    """The two huggingface_hub calls, recorded; ``uploaded`` lists the files of the folder during the upload."""
    import huggingface_hub

    calls = {"create_repo": [], "upload_folder": [], "uploaded": []}

    def create_repo(repo_id, **kwargs):
        calls["create_repo"].append({"repo_id": repo_id, **kwargs})
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(**kwargs):
        calls["upload_folder"].append(kwargs)
        root = Path(kwargs["folder_path"])
        calls["uploaded"].append(sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/abc123")

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    return calls


def test_export_pushes_the_exported_folder(checkpoint, hub, tmp_path, capsys):
    from allspark.cli import export_main

    out = tmp_path / "export"
    assert export_main(["--checkpoint", str(checkpoint), "--out", str(out), "--push-to-hub", "someone/allspark-hsi",
                        "--private", "--commit-message", "tiny HSI"]) == 0
    assert hub["create_repo"] == [{"repo_id": "someone/allspark-hsi", "token": None, "private": True,
                                   "exist_ok": True}]
    (call,) = hub["upload_folder"]
    assert call["repo_id"] == "someone/allspark-hsi" and Path(call["folder_path"]) == out.resolve()
    assert call["commit_message"] == "tiny HSI"
    (files,) = hub["uploaded"]
    assert {"config.json", "README.md", "allspark/model.safetensors", "allspark/config.yaml",
            "allspark/data_info.json"} <= set(files), files
    assert any(f.endswith(".safetensors") and "/" not in f for f in files), "the merged LLM's weights"
    assert "https://huggingface.co/someone/allspark-hsi/commit/abc123" in capsys.readouterr().out


def test_allspark_push_to_hub_uploads_the_saved_checkpoint(checkpoint, hub):
    from allspark.model import AllSpark

    model = AllSpark.from_pretrained(checkpoint)
    url = model.push_to_hub("allspark-hsi")
    assert url == "https://huggingface.co/allspark-hsi/commit/abc123"
    (call,) = hub["upload_folder"]
    assert call["repo_id"] == "allspark-hsi" and call["commit_message"].startswith("Upload AllSpark checkpoint")
    (files,) = hub["uploaded"]
    assert {"model.safetensors", "config.yaml", "data_info.json", "adapter/adapter_config.json",
            "adapter/adapter_model.safetensors"} <= set(files), files
    assert not Path(call["folder_path"]).exists(), "the staging folder is removed"


def test_without_huggingface_hub_the_push_is_one_clear_error_before_any_work(checkpoint, monkeypatch, tmp_path):
    from allspark.cli import export_main
    from allspark.model import AllSpark

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import huggingface_hub raises ImportError
    with pytest.raises(MissingPackageError, match=r"needs the huggingface_hub package.*pip install huggingface_hub"):
        export_main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "export"), "--push-to-hub", "a/b"])
    assert not (tmp_path / "export").exists(), "refused before the export"
    with pytest.raises(MissingPackageError, match="huggingface_hub"):
        AllSpark.from_pretrained(checkpoint).push_to_hub("a/b")


@pytest.mark.parametrize("repo_id", ["not a repo", "a/b/c", "--x"])
def test_a_malformed_repo_id_is_refused_before_the_export(checkpoint, hub, tmp_path, repo_id):
    from allspark.cli import export_main

    with pytest.raises(UserError, match=r"expected a Hub repository id 'name' or 'namespace/name'.*got"):
        export_main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "export"), f"--push-to-hub={repo_id}"])
    assert not (tmp_path / "export").exists() and not hub["upload_folder"]


def test_a_failed_upload_is_one_error_line_and_exit_2(checkpoint, monkeypatch, tmp_path, capsys):
    import huggingface_hub
    from huggingface_hub.errors import LocalTokenNotFoundError

    from allspark.cli import export_main, run_cli

    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: f"https://huggingface.co/{repo_id}")

    def no_token(**kwargs):
        raise LocalTokenNotFoundError("Token is required (`token=True`), but no token found.")

    monkeypatch.setattr(huggingface_hub, "upload_folder", no_token)
    with pytest.raises(SystemExit) as exited:
        run_cli(lambda: export_main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "export"),
                                     "--push-to-hub", "someone/allspark-hsi"]))
    assert exited.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: pushing ") and "'someone/allspark-hsi' failed: LocalTokenNotFoundError" in last
    assert "HF_TOKEN" in last
    assert (tmp_path / "export" / "config.json").is_file(), "the export itself is complete and kept"
