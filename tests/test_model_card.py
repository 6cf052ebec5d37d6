"""``best/README.md``: the model card written by training and refreshed by evaluation."""
import json

from allspark.config import load_config
from allspark.evaluate_run import evaluate_checkpoint
from allspark.training import train
from tests.helpers import TINY_HSI


def test_training_writes_a_model_card_and_evaluation_adds_its_figures(tmp_path):
    cfg = load_config("hsi", overrides=TINY_HSI + ["train.epochs=1", "train.max_steps=2"])
    run = tmp_path / "run"
    metrics = train(cfg, run)
    card = (run / "best" / "README.md").read_text()
    assert card.startswith("# AllSpark checkpoint: `hsi`")
    assert f"| **OA** | {metrics['OA']:.4g} |" in card  # the main metric first, in bold, with its value
    assert "| svm |" in card and "| encoder_probe (probe of this model) |" in card  # the config's baselines
    assert "`tiny` (frozen), adapter `lora` (r=8" in card and "trainable parameters:" in card
    assert "```yaml\nmodality: hsi" in card  # the resolved config
    assert "peft.PeftModel.from_pretrained" in card  # the LoRA run has an adapter folder
    assert "## Figures" not in card  # training writes no figure
    evaluate_checkpoint(run)
    card = (run / "best" / "README.md").read_text()
    evaluated = json.loads((run / "eval" / "metrics.json").read_text())
    assert f"| **OA** | {evaluated['OA']:.4g} |" in card
    links = [line[line.index("(") + 1: -1] for line in card.splitlines() if line.startswith("![")]
    assert links and all((run / "best" / link).resolve().is_file() for link in links)
    assert any(link.startswith("../eval/") and link.endswith(".png") for link in links)
