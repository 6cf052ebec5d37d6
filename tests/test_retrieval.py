"""Image-text retrieval (rgb-text): ranking metrics on hand-computed rankings (ties, queries with no
relevant item), chunked = full ranking, the readers and their errors, the symmetric InfoNCE value, V2TMap /
HFE, and a tiny two-stage training run that lifts R@5 above the untrained model."""
import json
import math

import numpy as np
import pytest
import torch

from allspark.data.base import DatasetFormatError
from allspark.data.captions import LuoJiaHOGMultiLabel, RSICDCaptions
from allspark.metrics.retrieval import label_ranking_metrics, rank_topk, recall_at_k, retrieval_metrics
from allspark.retrieval.losses import gather_with_grad, symmetric_info_nce
from allspark.retrieval.modules import HFE, V2TMap

LOG2_3, LOG2_5 = math.log2(3), math.log2(5)


def test_rank_topk_orders_ties_by_database_index():
    q = np.array([[1.0, 0.0]])
    db = np.array([[0.0, 1.0], [2.0, 0.0], [1.0, 0.0], [1.0, 1.0], [3.0, 0.0]])
    # cosines 0, 1, 1, 0.707, 1: the three ties keep database order
    assert rank_topk(q, db, 5).tolist() == [[1, 2, 4, 3, 0]]
    assert rank_topk(q, db, 2).tolist() == [[1, 2]]
    with pytest.raises(ValueError, match="need the same E"):
        rank_topk(q, np.zeros((3, 4)), 2)
    with pytest.raises(ValueError, match="NaN"):
        rank_topk(np.array([[np.nan, 0.0]]), db, 2)


def test_chunked_ranking_equals_full_ranking():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(37, 16)).round(1)  # rounding makes ties likely
    db = rng.normal(size=(53, 16)).round(1)
    db[10] = db[3]  # exact duplicates tie
    full = rank_topk(q, db, 20, chunk_size=10_000)
    assert np.array_equal(full, rank_topk(q, db, 20, chunk_size=5))
    # the top-k path equals the first k of a full stable sort, also with many ties across the cut
    from allspark.metrics.retrieval import _stable_topk

    g = torch.Generator().manual_seed(0)
    for k in (1, 3, 7, 29, 30):
        scores = torch.randint(0, 5, (9, 30), generator=g).float()
        assert torch.equal(_stable_topk(scores, k), torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k])
    labels_q, labels_db = rng.uniform(size=(37, 6)) < 0.3, rng.uniform(size=(53, 6)) < 0.3
    a = label_ranking_metrics(full, labels_q, labels_db, (5, 20), chunk_size=10_000)
    b = label_ranking_metrics(full, labels_q, labels_db, (5, 20), chunk_size=4)
    assert a == pytest.approx(b)


def test_label_metrics_hand_computed():
    # query 0 shares labels with the database as C = [1, 0, 2, 1]; ranked [1, 2, 0, 3] -> C by rank 0, 2, 1, 1
    # query 1 has no label at all: nothing is relevant (AP = WMAP = NDCG = ACG = 0, still counted)
    q = np.array([[1, 1, 0], [0, 0, 0]])
    db = np.array([[1, 0, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1]])
    topk = np.array([[1, 2, 0, 3], [0, 1, 2, 3]])
    m = label_ranking_metrics(topk, q, db, ns=(2, 4))
    dcg2, z2 = 3 / LOG2_3, 3 + 1 / LOG2_3
    dcg4, z4 = dcg2 + 1 / 2 + 1 / LOG2_5, z2 + 1 / 2
    expect_q0 = {"ACG@2": 1.0, "MAP@2": 0.5, "WMAP@2": 1.0, "NDCG@2": dcg2 / z2,
                 "ACG@4": 1.0, "MAP@4": (1 / 2 + 2 / 3 + 3 / 4) / 3, "WMAP@4": 1.0, "NDCG@4": dcg4 / z4}
    assert m == pytest.approx({k: v / 2 for k, v in expect_q0.items()})
    # the database smaller than n: @n uses all of it
    assert label_ranking_metrics(topk, q, db, ns=(10,))["ACG@10"] == pytest.approx(0.5)


def test_recall_and_full_retrieval_metrics():
    images = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    texts = np.array([[0.9, 0.1], [0.1, 0.9], [0.0, 1.0], [1.0, 1.0]])
    owner = np.array([0, 0, 1, 2])  # image 0 has two captions; text 1 is closer to image 1 than to its own
    m = retrieval_metrics(images, texts, owner, ks=(1, 2))
    # I2T: image0 -> text0 (hit); image1 -> text2 (hit); image2 -> text3 (hit)
    assert m["I2T_R@1"] == 1.0
    # T2I: text0 -> image0 ok; text1 -> image1 (miss at 1, image2 second: still a miss at 2), text2 -> image1, text3 -> image2
    assert m["T2I_R@1"] == 0.75 and m["T2I_R@2"] == 0.75
    assert m["mR"] == pytest.approx((1 + 1 + 0.75 + 0.75) / 4)
    assert recall_at_k(np.array([[2, 0], [1, 2]]), [0, 1], [0, 1, 2], ks=(1, 2)) == {1: 0.5, 2: 1.0}
    with pytest.raises(ValueError, match="owner is not an image index"):
        retrieval_metrics(images, texts, [0, 0, 1, 5])


def test_symmetric_info_nce_hand_case():
    img = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.28, 0.96]])
    txt = torch.tensor([[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]])
    scale = 2.0
    # cosines image i . text j
    s = [[0.8, 0.0, 1.0], [0.96, 0.8, 0.6], [0.8, 0.96, 0.28]]

    def ce(rows):  # mean over i of -log softmax(rows[i])[i], Eq. 25
        return sum(-math.log(math.exp(scale * r[i]) / sum(math.exp(scale * x) for x in r))
                   for i, r in enumerate(rows)) / len(rows)

    i2t = ce(s)
    t2i = ce([[s[j][i] for j in range(3)] for i in range(3)])
    loss, terms = symmetric_info_nce(img, txt, torch.tensor(scale))
    assert terms["loss_i2t"].item() == pytest.approx(i2t, rel=1e-5)
    assert terms["loss_t2i"].item() == pytest.approx(t2i, rel=1e-5)
    assert loss.item() == pytest.approx(i2t + t2i, rel=1e-5) and abs(i2t - t2i) > 0.005
    with pytest.raises(ValueError, match=r"both be \[b, E\]"):
        symmetric_info_nce(img, txt[:1], torch.tensor(scale))


def test_v2tmap_residual_and_hfe_shapes():
    v = V2TMap(8, alpha=0.0)
    x = torch.randn(3, 8)
    assert torch.equal(v(x), x)  # alpha 0 keeps the backbone feature
    v = V2TMap(8, alpha=1.0)
    assert torch.allclose(v(x), v.adapter(x))
    with pytest.raises(ValueError, match="alpha must be in"):
        V2TMap(8, alpha=1.5)
    hfe = HFE([4, 6, 8], 16, dim=8, heads=2)
    maps = [torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4), torch.randn(2, 8, 2, 2)]
    o_tc = torch.randn(2, 16)
    assert torch.equal(hfe(maps, o_tc), o_tc)  # zero-initialised output: stage 2 starts at the stage-1 feature
    torch.nn.init.normal_(hfe.out.weight)
    out = hfe(maps, o_tc)
    assert out.shape == (2, 16) and not torch.equal(out, o_tc)
    with pytest.raises(ValueError, match=r"o_v3 must be \[B, 6, h, w\]"):
        hfe([maps[0], torch.randn(2, 5, 4, 4), maps[2]], o_tc)


@pytest.fixture()
def demo_dirs(tmp_path):
    RSICDCaptions.write_demo(tmp_path / "rsicd", seed=0, num_images=20)
    LuoJiaHOGMultiLabel.write_demo(tmp_path / "hog", seed=0, num_images=20)
    return tmp_path / "rsicd", tmp_path / "hog"


def test_readers_layouts_and_items(demo_dirs):
    rsicd, hog = demo_dirs
    data = json.loads((rsicd / "dataset_demo.json").read_text())
    assert {"filename", "split", "sentences"} <= set(data["images"][0])
    sizes = [len(RSICDCaptions(rsicd, s, image_size=32)) for s in ("train", "val", "test")]
    assert sizes == [14, 2, 4]
    test = RSICDCaptions(rsicd, "test", image_size=32)
    item = test[0]
    assert item["image"].shape == (3, 32, 32) and len(item["captions"]) == 3
    assert bytes(item["caption_bytes"][0].numpy()).rstrip(b"\0").decode() == item["captions"][0]
    train = RSICDCaptions(rsicd, "train", image_size=32)
    assert len(train[0]["captions"]) == 1 and train[0]["captions"][0] in train.records[0]["captions"]
    batch = test.collate([test[0], test[1]])
    assert batch["image"].shape == (2, 3, 32, 32) and len(batch["captions"]) == 2
    h = LuoJiaHOGMultiLabel(hog, "test", image_size=32)
    it = h[0]
    assert it["labels_third"].shape == (8,) and it["labels_second"].shape == (4,)
    names = h.info()["label_names_third"]
    line = json.loads((hog / "annotations.jsonl").read_text().splitlines()[
        [i for i, ln in enumerate((hog / "annotations.jsonl").read_text().splitlines())
         if json.loads(ln)["image"] == h.records[0]["file"]][0]])
    assert sorted(names[j] for j in np.flatnonzero(it["labels_third"].numpy())) == sorted(line["third_level"])
    # every third-level label appears in the caption (captions are written from the scene content)
    assert all(lbl in line["caption"].lower() for lbl in line["third_level"])


def test_reader_errors(demo_dirs, tmp_path):
    rsicd, hog = demo_dirs
    (rsicd / "images" / RSICDCaptions(rsicd, "val").records[0]["file"]).unlink()
    with pytest.raises(DatasetFormatError, match=r"dataset_demo\.json names image 'scene_\d+\.png', but .* does not exist"):
        RSICDCaptions(rsicd, "val")
    data = json.loads((rsicd / "dataset_demo.json").read_text())
    for entry in data["images"]:
        entry["split"] = "train"
    (rsicd / "dataset_demo.json").write_text(json.dumps(data))
    with pytest.raises(DatasetFormatError, match=r"split 'test' of .*dataset_demo\.json has no images"):
        RSICDCaptions(rsicd, "test")
    (rsicd / "dataset_demo.json").write_text("{broken")
    with pytest.raises(DatasetFormatError, match="is not valid JSON"):
        RSICDCaptions(rsicd, "train")
    with pytest.raises(DatasetFormatError, match=r"expected one dataset_\*\.json"):
        RSICDCaptions(hog, "train")
    lines = (hog / "annotations.jsonl").read_text().splitlines()
    (hog / "annotations.jsonl").write_text("\n".join(lines + ['{"image": "x.png", "caption": "a"}']) + "\n")
    with pytest.raises(DatasetFormatError, match=r"line 21 lacks 'second_level'"):
        LuoJiaHOGMultiLabel(hog, "train")
    (hog / "annotations.jsonl").write_text("\n".join(lines + ["not json"]) + "\n")
    with pytest.raises(DatasetFormatError, match="line 21 is not JSON"):
        LuoJiaHOGMultiLabel(hog, "train")
    with pytest.raises(DatasetFormatError, match="annotation file .* is missing"):
        LuoJiaHOGMultiLabel(tmp_path, "train")


TINY = [
    "model.llm.name=tiny", "model.llm.dtype=float32",
    "model.encoders.0.args={model_name: small_cnn, weights: none, image_size: 64, channels: [16, 32, 32]}",
    "data.args={image_size: 64}",
    "model.bridge={num_queries: 4, depth: 1, heads: 2, ff_mult: 2}",
    "model.head.args={embed_dim: 32, alpha: 0.9, max_caption_tokens: 24, hfe: false, hfe_channels: [16, 32, 32], "
    "hfe_dim: 16, hfe_heads: 2}",
    "data.batch_size=28", "data.eval_batch_size=64",
    "train.lr=3e-3", "train.epochs=8", "train.warmup_epochs=0.5", "train.log_every_steps=3",
]


def test_tiny_two_stage_training_lifts_recall(tmp_path):
    from safetensors.torch import load_file

    from allspark.config import load_config
    from allspark.retrieval.baseline import untrained_metrics
    from allspark.training import train

    LuoJiaHOGMultiLabel.write_demo(tmp_path / "data", seed=1, num_images=120)
    cfg = load_config("rgb-text", overrides=TINY + [f"data.root={tmp_path / 'data'}", "train.stages=[{name: v2tmap, "
                      "overrides: {}}, {name: hfe, overrides: {model.head.args.hfe: true, train.epochs: 2, "
                      "train.train_only: ['head.hfe.*']}}]"])
    before = untrained_metrics(cfg)
    metrics = train(cfg, tmp_path / "run")
    stage1 = metrics["stages"]["v2tmap"]
    assert stage1["I2T_R@5"] + stage1["T2I_R@5"] > before["I2T_R@5"] + before["T2I_R@5"] + 0.2
    assert stage1["I2T_WMAP@5"] > before["I2T_WMAP@5"]
    w1 = load_file(str(tmp_path / "run" / "stage1-v2tmap" / "best" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "run" / "best" / "model.safetensors"))
    # stage 2 held everything from stage 1 (V2TMap, projections, bridge, LoRA) and trained only HFE
    assert set(w2) - set(w1) and all(k.startswith("head.hfe.") for k in set(w2) - set(w1))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert any(not torch.equal(w2[k], torch.zeros_like(w2[k])) for k in w2 if k.startswith("head.hfe.out."))
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(saved["stages"]) == {"v2tmap", "hfe"} and "I2T_WMAP@5" in saved


GATHER_SCRIPT = r"""
import os, sys, torch, torch.distributed as dist
from allspark.retrieval.losses import gather_with_grad, symmetric_info_nce
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2)
n = 3 if rank == 0 else 2                       # unequal local batches
x = torch.full((n, 2), float(rank + 1), requires_grad=True)
rows, offset = gather_with_grad(x)
assert rows.shape == (5, 2) and offset == (0 if rank == 0 else 3), (rows.shape, offset)
assert rows[:3].eq(1).all() and rows[3:].eq(2).all()
rows.sum().backward()                           # only the local rows carry gradient
assert x.grad.eq(1).all()
img = torch.nn.functional.normalize(torch.randn(n, 4, generator=torch.Generator().manual_seed(rank)), dim=1)
loss, _ = symmetric_info_nce(img, img.clone(), torch.tensor(5.0))
assert torch.isfinite(loss)
dist.barrier()
dist.destroy_process_group()  # a gloo process exiting with the group alive can abort at teardown
print("ok", rank)
"""


@pytest.mark.slow
def test_gather_with_grad_across_two_processes(tmp_path):
    import os
    import subprocess
    import sys

    from tests.helpers import ROOT

    script = tmp_path / "gather.py"
    script.write_text(GATHER_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(tmp_path / "init")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    # with one process (no group) gathering is the identity
    x = torch.randn(3, 2)
    rows, offset = gather_with_grad(x)
    assert rows is x and offset == 0


def test_model_on_caption_dataset_embeds_every_caption(demo_dirs):
    from allspark.config import load_config
    from allspark.evaluation.retrieval import RetrievalEvaluator
    from allspark.model import AllSpark

    rsicd, _ = demo_dirs
    cfg = load_config("rgb-text", overrides=TINY + [f"data.root={rsicd}", "data.dataset=rsicd_captions",
                                                    "train.stages=[]"])
    test = RSICDCaptions(rsicd, "test", image_size=64)
    model = AllSpark(cfg, test.info()).eval()
    batch = test.collate([test[i] for i in range(len(test))])
    with torch.no_grad():
        out = model(batch)
    pred = out.predictions
    assert pred["image_emb"].shape == (4, 32) and pred["text_emb"].shape == (4, 3, 32) and pred["text_mask"].all()
    assert torch.allclose(pred["text_emb"].norm(dim=-1), torch.ones(4, 3), atol=1e-5)
    ev = RetrievalEvaluator(test.info())  # no labels in this layout: recall only
    gathered = {k: v.numpy() for k, v in pred.items()}
    gathered.update({k: batch[k].numpy() for k in ev.batch_keys})
    m = ev.compute(gathered)
    assert m["num_images"] == 4 and m["num_captions"] == 12 and "I2T_MAP@5" not in m
    assert 0 <= m["mR"] <= 1
    batch["captions"][0] = []
    with pytest.raises(ValueError, match="every image needs at least one caption"):
        model(batch)
