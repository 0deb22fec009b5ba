"""Load-once evaluation (clipprune.evaluator) against the per-row code it replaced: for every kind of row, the
metrics equal clip_benchmark's `evaluate` run on a freshly loaded model, one row at a time."""
import copy

import open_clip
import pytest
import torch

from clipprune import methods as M
from clipprune import prompts as P
from clipprune import vit as V
from clipprune.data import stratified_indices
from clipprune.errors import ClipPruneError
from clipprune.evaluator import evaluate_rows
from clipprune.experiment import Setup
from clipprune.golden import FORMAT as RANKING_FORMAT
from clipprune.predictor import RankPredictor, save_predictor
from clipprune.zeroshot import classifier_weights, evaluate

CLASSES = ["circle", "square", "triangle", "cross", "diamond", "ring"]
TEMPLATES = ["a photo of a {c}.", "a drawing of a {c}."]
N, LAYER, KEEP = 40, 1, 0.5


class Tagged(torch.utils.data.Dataset):
    """Random images whose pixel (0, 0, 0) holds their index, so a batch says which images it holds. Labelled by
    the unpruned model's own zero-shot prediction, so pruned rows are right on some images and wrong on others."""

    def __init__(self, n: int, model, tok):
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 3, 32, 32, generator=g)
        self.images[:, 0, 0, 0] = torch.arange(n, dtype=torch.float)
        with torch.no_grad():
            self.labels = (model.encode_image(self.images) @ classifier_weights(model, tok, CLASSES, TEMPLATES)).argmax(1)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.manual_seed(0)
    model = open_clip.CLIP(embed_dim=32, vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=3, head_width=32),
                           text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2)).eval()
    with torch.no_grad():  # at random init the CLS embedding dominates: every image would get one class
        model.visual.class_embedding.zero_()
        model.visual.positional_embedding.mul_(0.1)
        model.visual.conv1.weight.mul_(5)
    tok = open_clip.get_tokenizer("ViT-B-32")  # the BPE vocab ships with open_clip: offline
    tmp = tmp_path_factory.mktemp("rows")
    n_patches = V.num_patches(model.visual)
    order = torch.stack([torch.randperm(n_patches, generator=torch.Generator().manual_seed(i)) for i in range(N)])
    torch.save({"meta": {"format": RANKING_FORMAT}, "patch_order": order.to(torch.int16), "unit_order": order,
                "unit_scores": torch.zeros(N, n_patches), "labels": torch.zeros(N, dtype=torch.long)}, tmp / "rank.pt")
    torch.manual_seed(1)
    predictor = RankPredictor.for_vit(model.visual, d=8)
    save_predictor(tmp / "pred.pt", predictor, {"layer": LAYER})
    pred = M.build_method("predictor", path=str(tmp / "pred.pt"))
    for name, method, keep in (("pruned", pred, KEEP), ("full", M.build_method("full"), 1.0)):
        tuned = P.init_tokens(model=model, tokenizer=tok, method=method, keep=keep, layer=LAYER, visual={"n": 2},
                              text={"n_ctx": 4, "init": None}, seed=3)
        tuned.save(tmp / f"tokens-{name}.pt")
    setups = {
        "full": Setup("full", M.build_method("full"), 1.0, LAYER),
        "random": Setup("random", M.build_method("random", seed=5), KEEP, LAYER),
        "cls_attention": Setup("cls_attention", M.build_method("cls_attention"), KEEP, LAYER),
        "tome": Setup("tome", M.build_method("tome", r=2.5), 1.0, LAYER),
        "golden": Setup("golden", M.build_method("ranking"), KEEP, LAYER, ranking=tmp / "rank.pt"),
        "predictor": Setup("predictor", M.build_method("predictor", path=str(tmp / "pred.pt")), KEEP, LAYER),
        "predictor+tokens": Setup("predictor+tokens", M.build_method("predictor", path=str(tmp / "pred.pt")), KEEP,
                                  LAYER, tokens=tmp / "tokens-pruned.pt"),
        "full+tokens": Setup("full+tokens", M.build_method("full"), 1.0, LAYER, tokens=tmp / "tokens-full.pt"),
    }
    return model, tok, setups


def fresh(setups):
    """New method instances (a random row's stream, a predictor's module): what a new process would build."""
    return {k: Setup(s.label, M.build_method(s.method.name, **{f: getattr(s.method, f) for f in s.method.options()}),
                     s.keep, s.layer, tokens=s.tokens, ranking=s.ranking) for k, s in setups.items()}


def per_row_reference(setup, model, tok, test, indices, batch_size):
    """The code this replaced: a fresh model per row, pruned, its classifier, clip_benchmark's evaluate."""
    from clipprune.golden import load_ranking

    model = copy.deepcopy(model)
    if setup.tokens is not None:
        tuned = P.TunedTokens.load(setup.tokens)
        tuned.apply(model, method=setup.method, keep=setup.keep, layer=setup.layer)
        clf = tuned.classifier(model, tok, CLASSES, templates=TEMPLATES)
    else:
        M.prune(model, setup.method, keep=setup.keep, layer=setup.layer)
        clf = classifier_weights(model, tok, CLASSES, TEMPLATES)
    subset = test if indices is None else torch.utils.data.Subset(test, list(indices))
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False)
    if setup.ranking is not None:
        order = load_ranking(setup.ranking).patch_order
        rows = order[torch.as_tensor(list(indices))] if indices is not None else order
        loader = M.bound_batches(loader, setup.method, rows)
    return evaluate(model, loader, tokenizer=tok, classnames=CLASSES, templates=TEMPLATES, classifier=clf)


@pytest.mark.parametrize("subset", [False, True])
def test_every_row_equals_clip_benchmark_on_a_fresh_model(world, subset):
    """All rows in one pass give exactly what each row alone gave through clip_benchmark: the same spec serves
    every batch (random's seeded stream advances as before), rankings bind by original index, tokens apply."""
    model, tok, setups = world
    test = Tagged(N, model, tok)
    indices = stratified_indices(test.labels.tolist(), 23, seed=0) if subset else None
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = evaluate_rows(fresh(setups), model=model, tokenizer=tok, test=test, classnames=CLASSES, templates=TEMPLATES,
                        batch_size=7, indices=indices)
    for label, setup in fresh(setups).items():
        ref = per_row_reference(setup, model, tok, test, indices, batch_size=7)
        assert got[label].metrics == ref, label
        assert len(got[label].correct) == (len(indices) if subset else N)
        assert got[label].correct.sum().item() / len(got[label].correct) == ref["acc1"]
    # The rows differ from each other (the comparison can see a row evaluated as another), and the model is left
    # unpatched and unchanged.
    assert len({tuple(e.correct.tolist()) for e in got.values()}) > 3
    assert not V.is_patched(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_golden_rows_follow_the_images_original_test_index(world, tmp_path):
    """The oracle on a subset: each image is pruned by the ranking row of its own (original) test index."""
    model, tok, setups = world
    test = Tagged(N, model, tok)
    seen, bound = [], []
    setup = fresh({"golden": setups["golden"]})["golden"]
    bind = setup.method.bind
    setup.method.bind = lambda rows: (bound.append(rows.clone()), bind(rows))
    hook = model.visual.register_forward_pre_hook(lambda m, a: seen.append(a[0][:, 0, 0, 0].long().tolist()))
    indices = stratified_indices(test.labels.tolist(), 17, seed=2)
    try:
        evaluate_rows({"golden": setup}, model=model, tokenizer=tok, test=test, classnames=CLASSES,
                      templates=TEMPLATES, batch_size=5, indices=indices)
    finally:
        hook.remove()
    from clipprune.golden import load_ranking

    order = load_ranking(setup.ranking).patch_order
    assert sum(seen, []) == indices
    for ids, rows in zip(seen, bound):
        assert torch.equal(rows.cpu(), order[torch.as_tensor(ids)])
    with pytest.raises(ClipPruneError, match=f"outside the {N} ranked test images"):
        evaluate_rows({"golden": setup}, model=model, tokenizer=tok, test=test, classnames=CLASSES,
                      templates=TEMPLATES, batch_size=5, indices=[3, N])


def test_worker_processes_change_nothing(world):
    """Images arrive in the same order for any number of DataLoader workers: identical metrics, image by image."""
    model, tok, setups = world
    test = Tagged(N, model, tok)
    runs = [evaluate_rows(fresh(setups), model=model, tokenizer=tok, test=test, classnames=CLASSES,
                          templates=TEMPLATES, batch_size=6, workers=w) for w in (0, 2)]
    for label in setups:
        assert runs[0][label].metrics == runs[1][label].metrics
        assert torch.equal(runs[0][label].correct, runs[1][label].correct)
