import pytest

from prompts import list_prompt_sets, load_prompts

MODALITIES = ["text", "code", "rgb", "msi", "hsi", "table", "trajectory", "sar", "infrared", "graph",
              "oblique", "video", "pointcloud"]


def test_all_thirteen_modalities_have_prompts():
    assert set(MODALITIES) <= set(list_prompt_sets())
    for name in MODALITIES:
        info = {"class_names": ["airplane", "beach"]} if name == "rgb" else None
        prompts = load_prompts(name, info)
        assert 1 <= len(prompts) <= 4 and all(p.strip() for p in prompts)


def test_table_xvi_first_prompts():
    assert load_prompts("hsi")[0] == (
        "Given the spectral information, can you help determine which class this pixel belongs to?"
    )
    assert len(load_prompts("hsi")) == 3 and len(load_prompts("pointcloud")) == 3


def test_rgb_category_placeholder_filled_from_class_names():
    first = load_prompts("rgb", {"class_names": ["airplane", "beach", "forest"]})[0]
    assert first.endswith("categories: airplane, beach, forest")
    with pytest.raises(ValueError, match="categories"):
        load_prompts("rgb", {})


def test_unknown_prompt_set():
    with pytest.raises(KeyError, match="hsi"):
        load_prompts("hsii")
