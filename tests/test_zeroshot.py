import io
import json
import math
import os

import numpy as np

import open_clip
import pytest
import torch
import torch.nn.functional as F

import webdataset as wds
from PIL import Image

from clipprune.data import load_dataset
from clipprune.io import write_json_atomic
from clipprune.zeroshot import classifier_weights, evaluate, result_record

os.environ.setdefault("HF_HUB_OFFLINE", "1")
CLASSES6 = ["circle", "square", "triangle", "cross", "diamond", "ring"]
TEMPLATES = ["a photo of a {c}.", "a drawing of a {c}."]


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    model = open_clip.CLIP(embed_dim=32,
                           vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32),
                           text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2))
    return model.eval(), open_clip.get_tokenizer("ViT-B-32")  # the BPE vocab ships with open_clip: offline


class Oracle(torch.nn.Module):
    """Real text tower; the image 'feature' of an image is row table[c] where c is written in pixel (0,0,0)."""

    def __init__(self, clip, table: torch.Tensor):
        super().__init__()
        self.clip, self.table = clip, table
        self.modes = []

    def encode_text(self, text):
        return self.clip.encode_text(text)

    def encode_image(self, images):
        self.modes.append(self.training)
        return self.table[images[:, 0, 0, 0].long()]


def loader(labels: list[int], batch_size: int = 4):
    images = torch.rand(len(labels), 3, 32, 32)
    images[:, 0, 0, 0] = torch.tensor(labels, dtype=torch.float)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.tensor(labels)),
                                       batch_size=batch_size)


def test_classifier_weights_is_normalised_mean_of_normalised_prompts(clip):
    model, tok = clip
    w = classifier_weights(model, tok, CLASSES6, TEMPLATES)
    assert w.shape == (32, 6)
    with torch.no_grad():
        for c, name in enumerate(CLASSES6):
            e = F.normalize(model.encode_text(tok([t.format(c=name) for t in TEMPLATES])), dim=-1).mean(0)
            torch.testing.assert_close(w[:, c], e / e.norm(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.norm(dim=0), torch.ones(6))


def test_random_model_metrics_in_range(clip):
    model, tok = clip
    labels = [i % 6 for i in range(12)]
    m = evaluate(model, loader(labels), tokenizer=tok, classnames=CLASSES6, templates=TEMPLATES)
    assert set(m) == {"acc1", "acc5", "mean_per_class_recall"}
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in m.values())
    assert m["acc1"] <= m["acc5"]


def test_image_features_equal_to_class_embeddings_classify_perfectly(clip):
    model, tok = clip
    w = classifier_weights(model, tok, CLASSES6, TEMPLATES)
    labels = [0, 5, 3, 3, 1, 2, 4, 0, 5]
    oracle = Oracle(model, w.T.clone())
    m = evaluate(oracle, loader(labels), tokenizer=tok, classnames=CLASSES6, templates=TEMPLATES)
    assert m == {"acc1": 1.0, "acc5": 1.0, "mean_per_class_recall": 1.0}

    # features of the next class: top-1 must be wrong for every image
    shifted = Oracle(model, w.T[torch.tensor([(c + 1) % 6 for c in range(6)])].clone())
    m = evaluate(shifted, loader(labels), tokenizer=tok, classnames=CLASSES6, templates=TEMPLATES)
    assert m["acc1"] == 0.0 and m["mean_per_class_recall"] == 0.0

    # a given classifier replaces the template one: with the columns permuted the same way, right again
    m = evaluate(shifted, loader(labels), tokenizer=tok, classnames=CLASSES6, templates=TEMPLATES,
                 classifier=w[:, torch.tensor([(c + 1) % 6 for c in range(6)])])
    assert m["acc1"] == 1.0


def test_evaluate_through_a_wds_loader(clip, tmp_path):
    """The iterable wds pipeline (no len) from clipprune.data goes through evaluate unchanged."""
    model, tok = clip
    labels = [4, 0, 2, 1, 3, 5, 0]
    (tmp_path / "test").mkdir()
    with wds.TarWriter(str(tmp_path / "test" / "0.tar")) as w:
        for i, y in enumerate(labels):
            buf = io.BytesIO()
            Image.new("RGB", (32, 32), (y, 0, 0)).save(buf, format="PNG")  # lossless: pixel (0,0,0) = label
            w.write({"__key__": f"{i:04d}", "png": buf.getvalue(), "cls": y})
    (tmp_path / "test" / "nshards.txt").write_text("1")
    (tmp_path / "classnames.txt").write_text("\n".join(CLASSES6))
    (tmp_path / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES))
    ld = load_dataset("wds/tiny", root=tmp_path, split="test",
                      transform=lambda im: torch.from_numpy(np.array(im)).permute(2, 0, 1).float())
    w = classifier_weights(model, tok, ld.classnames, ld.templates)
    m = evaluate(Oracle(model, w.T.clone()), ld.loader(batch_size=3), tokenizer=tok, classnames=ld.classnames,
                 templates=ld.templates)
    assert m == {"acc1": 1.0, "acc5": 1.0, "mean_per_class_recall": 1.0}


def test_fewer_than_five_classes_gives_acc5_none(clip):
    model, tok = clip
    classes = ["small", "medium", "large"]
    w = classifier_weights(model, tok, classes, TEMPLATES)
    m = evaluate(Oracle(model, w.T.clone()), loader([0, 1, 2, 2]), tokenizer=tok, classnames=classes,
                 templates=TEMPLATES)
    assert m == {"acc1": 1.0, "acc5": None, "mean_per_class_recall": 1.0}  # clip_benchmark says NaN


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_evaluate_runs_in_eval_mode_and_restores_modes(clip):
    model, tok = clip
    oracle = Oracle(model, torch.randn(6, 32)).train()
    model.visual.eval()  # a frozen tower inside a training wrapper stays frozen
    evaluate(oracle, loader([0, 1]), tokenizer=tok, classnames=CLASSES6, templates=TEMPLATES)
    assert oracle.modes == [False]
    assert oracle.training and model.training and model.transformer.training and not model.visual.training
    model.eval()


def test_result_record_schema_and_atomic_json(tmp_path):
    metrics = {"acc1": 0.5, "acc5": None, "mean_per_class_recall": 0.25}
    rec = result_record(dataset="synth/size", model="clipprune-tiny", pretrained=None, metrics=metrics,
                        method="golden", keep=0.6, layer=3, gflops=1.25, extra={"seed": 0})
    assert rec == {"dataset": "synth/size", "model": "clipprune-tiny", "pretrained": "",
                   "task": "zeroshot_classification", "metrics": metrics, "method": "golden", "keep": 0.6,
                   "layer": 3, "gflops": 1.25, "seed": 0}
    path = write_json_atomic(tmp_path / "eval" / "size" / "golden.json", rec)
    text = path.read_text()
    assert json.loads(text) == rec and '"acc5": null' in text
    assert list(json.loads(text)) == sorted(rec) and text.endswith("\n")
    assert os.listdir(path.parent) == ["golden.json"]  # no temp file left behind

    with pytest.raises(ValueError):  # NaN is not JSON; it must not reach the file
        write_json_atomic(path, {"acc5": math.nan})
    assert json.loads(path.read_text()) == rec and os.listdir(path.parent) == ["golden.json"]
    with pytest.raises(ValueError, match="method"):
        result_record(dataset="d", model="m", pretrained="p", metrics={}, method="x", keep=1.0, layer=0,
                      gflops=1.0, extra={"method": "y"})
