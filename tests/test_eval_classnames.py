"""Class lists against the datasets' official class counts; prompt templates."""

import pytest

from gem_jax.eval import CLASSES, DATASETS, IMAGENET_TEMPLATES, NAME_SETS, names_for, read_names

OFFICIAL = {"voc21": 21, "voc20": 20, "context60": 60, "context59": 59, "ade20k": 150,
            "coco_stuff": 171, "coco_object": 81, "cityscapes": 19}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_class_counts(name):
    assert len(CLASSES[name]) == OFFICIAL[name] == DATASETS[name].num_classes
    assert len(set(CLASSES[name])) == OFFICIAL[name]  # no duplicate names
    for s in NAME_SETS.values():
        assert len(s[name]) == OFFICIAL[name]
        assert all(p and all(q.strip() == q and q for q in p) for p in s[name])


def test_background_conventions():
    for name in ("voc21", "context60", "coco_object"):
        assert DATASETS[name].has_background and CLASSES[name][0] == "background"
    assert CLASSES["voc21"][1:] == CLASSES["voc20"]
    assert CLASSES["context60"][1:] == CLASSES["context59"]
    assert CLASSES["coco_object"][1:] == CLASSES["coco_stuff"][:80]
    assert DATASETS["voc20"].reduce_zero_label and DATASETS["context59"].reduce_zero_label
    assert DATASETS["ade20k"].reduce_zero_label
    assert not DATASETS["coco_stuff"].reduce_zero_label and not DATASETS["cityscapes"].reduce_zero_label
    # SCLIP prompts the VOC21 / COCO-Object background with stuff words, and persons with synonyms
    assert len(NAME_SETS["sclip"]["voc21"][0]) == 26 and "sky" in NAME_SETS["sclip"]["voc21"][0]
    assert NAME_SETS["sclip"]["voc20"][14][0] == "person" and len(NAME_SETS["sclip"]["voc20"][14]) == 7


def test_imagenet_templates():
    assert len(IMAGENET_TEMPLATES) == 80 == len(set(IMAGENET_TEMPLATES))
    assert all(t.count("{}") == 1 for t in IMAGENET_TEMPLATES)
    assert "a photo of a {}." in IMAGENET_TEMPLATES


def test_names_file(tmp_path):
    f = tmp_path / "names.txt"
    f.write_text("\n".join(["sky, wall"] + [f"thing {i}" for i in range(20)]) + "\n\n")
    n = names_for("voc21", f)
    assert n[0] == ["sky", "wall"] and n[20] == ["thing 19"]
    assert read_names(f) == n
    with pytest.raises(ValueError, match="lists 21 classes but voc20 has 20"):
        names_for("voc20", f)
    with pytest.raises(ValueError, match="neither"):
        names_for("voc20", tmp_path / "missing.txt")
