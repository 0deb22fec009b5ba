"""Phase III learnable tokens: no-op at zero, CoOp equals the hand template, tokens survive pruning, only the
tokens learn, tuning lowers the loss, save/load round trip, FLOPs count the tokens; the IVLP/VPT recipe against
Dassl's own code (few-shot draw on real CoOp splits, warm-up + cosine schedule, crop + flip augmentation)."""
import json
import os
import random
from collections import defaultdict
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.model import CLIP

from clipprune import flops as FL
from clipprune import methods as M
from clipprune import prompts as P
from clipprune import vit as V
from clipprune import zeroshot as Z
from clipprune.errors import ClipPruneError
from conftest import tiny_clip

NAMES = ["red square", "blue circle"]
TEMPLATE = ["a photo of a {c}."]
METHODS = [("random", {}), ("cls_attention", {"fuse": True}), ("tome", {"r": 2}), ("predictor", {})]
KEEP, LAYER = 0.5, 2


class PatchScores(torch.nn.Module):
    """A stand-in ranking predictor: a fixed linear score per patch token."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(width, generator=torch.Generator().manual_seed(1)))

    def forward(self, x):
        return x[:, 1:] @ self.w


def method_of(name: str, cfg: dict) -> M.Method:
    return M.PredictorPruning.from_module(PatchScores()) if name == "predictor" else M.build_method(name, **cfg)


def text_clip(seed: int = 0) -> CLIP:
    """tiny_clip's image tower with a text tower over the real vocabulary, so the real tokenizer works."""
    torch.manual_seed(seed)
    return CLIP(embed_dim=32, vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=4, head_width=32),
                text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1)).eval()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return open_clip.tokenizer.SimpleTokenizer(context_length=16)


@pytest.fixture
def model():
    return text_clip()


def images(n=2, size=32, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


class Blobs(torch.utils.data.Dataset):
    """Two classes told apart by the sign of the image's mean: a separable toy problem."""

    def __init__(self, n: int = 12, seed: int = 0):
        self.targets = [i % 2 for i in range(n)]
        sign = torch.tensor([1.0 if y == 0 else -1.0 for y in self.targets]).view(-1, 1, 1, 1)
        self.images = sign + 0.5 * images(n, seed=seed)

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.images[i], self.targets[i]


def encode(model, x):
    with torch.no_grad():
        return model.encode_image(x)


@pytest.mark.parametrize("name,cfg", METHODS)
def test_zero_tokens_and_hand_template_change_nothing(name, cfg, model, tok):
    x = images()
    M.prune(model, method_of(name, cfg), keep=KEEP, layer=LAYER)
    ref = encode(model, x)
    V.unpatch(model)
    tuned = P.init_tokens(model=model, tokenizer=tok, method=method_of(name, cfg), keep=KEEP, layer=LAYER,
                          visual={"n": 0}, text=None, templates=TEMPLATE)
    assert len(tuned.state_dict()) == 0
    tuned.apply(model)
    assert torch.equal(encode(model, x), ref)
    assert torch.equal(tuned.classifier(model, tok, NAMES), Z.classifier_weights(model, tok, NAMES, TEMPLATE))
    V.unpatch(model)
    # The comparison is sensitive: two tokens do change the output.
    some = P.init_tokens(model=model, tokenizer=tok, method=method_of(name, cfg), keep=KEEP, layer=LAYER,
                         visual={"n": 2}, text=None)
    some.apply(model)
    assert not torch.allclose(encode(model, x), ref)


def test_text_context_from_phrase_equals_hand_template(model, tok):
    ctx = P.TextContext.build(model, tok, init="a photo of a")
    assert ctx.n_ctx == 4
    ref = Z.classifier_weights(model, tok, NAMES + ["cat"], TEMPLATE)
    got = ctx.classifier(model, tok, NAMES + ["cat"])
    assert got.shape == ref.shape == (32, 3)
    assert (got - ref).abs().max().item() <= 1e-5
    # A random context is a different classifier; a wrong n_ctx for the phrase is one clear error.
    other = P.TextContext.build(model, tok, n_ctx=4, seed=3).classifier(model, tok, NAMES + ["cat"])
    assert (other - ref).abs().max().item() > 1e-3
    with pytest.raises(ClipPruneError, match="n_ctx"):
        P.TextContext.build(model, tok, n_ctx=3, init="a photo of a")


def block_inputs(vit):
    """Input of every block, recorded at its ln_1 (merged ToMe blocks bypass block.__call__)."""
    seen, hooks = {}, []
    for i, b in enumerate(vit.transformer.resblocks):
        # Keyed by block: cls_attention recomputes ln_1 of the block before L on the same tokens.
        hooks.append(b.ln_1.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0].detach().clone())))
    return seen, hooks


@pytest.mark.parametrize("deep", [False, True])
@pytest.mark.parametrize("name,cfg", METHODS)
def test_tokens_survive_pruning(name, cfg, deep, tok):
    model, n = text_clip(), 3
    method = method_of(name, cfg)
    tuned = P.init_tokens(model=model, tokenizer=tok, method=method, keep=KEEP, layer=LAYER,
                          visual={"n": n, "deep": deep}, text=None)
    vis = tuned.visual
    vit = tuned.apply(model)
    seen, hooks = block_inputs(vit)
    out = encode(model, images(2))
    for h in hooks:
        h.remove()
    dims = V.ViTDims.of(vit)
    at = 0 if name == "tome" else LAYER  # ToMe reduces from block 0: that is where its tokens enter
    assert vis.layer == at
    counts = method.token_counts(dims, keep=KEEP, layer=LAYER)
    expected = [a + (n if i >= at else 0) for i, (a, _) in enumerate(counts)]
    assert [seen[i].shape[1] for i in range(dims.depth)] == expected
    if name != "tome":
        assert seen[dims.depth - 1].shape[1] == round(KEEP * dims.n_patches) + 1 + int(cfg.get("fuse", False)) + n
    # The tokens sit last, unchanged where they enter; deep swaps in each block's own fresh set.
    assert vis.blocks == ([at] + list(range(at + 1, dims.depth)) if deep else [at])
    for block, tokens in zip(vis.blocks, vis.sets):
        assert torch.equal(seen[block][:, -n:], tokens.detach().expand(2, -1, -1))
    if not deep:
        assert not torch.allclose(seen[at + 1][:, -n:], vis.sets[0].detach().expand(2, -1, -1))
    assert out.shape == (2, 32)
    # They are dropped before pooling: the tower's output tokens are the image tokens only.
    vit.output_tokens = True
    with torch.no_grad():
        _, tokens = vit(images(2))
    assert tokens.shape[1] == (counts[-1][1] if name == "tome" else counts[-1][0]) - 1


def test_tome_never_merges_the_tokens():
    # Two tokens marked in channel 0 have near-identical keys: plain ToMe would merge them first.
    model = tiny_clip()
    vit = M.prune(model, M.build_method("tome", r=2), keep=1.0, layer=0)
    tokens = P.VisualTokens.for_model(vit, layer=0, n=2)
    with torch.no_grad():
        tokens.sets[0][:, 0] = 100.0
    P.attach(vit, tokens)
    seen, hooks = block_inputs(vit)
    encode(model, images(2))
    for h in hooks:
        h.remove()
    for i, x in seen.items():
        marked = (x[..., 0] > 50).float()
        assert torch.equal(marked, torch.cat([torch.zeros_like(marked[:, :-2]), torch.ones_like(marked[:, -2:])], 1)), i


def test_deep_tokens_start_at_depth_from(tok):
    model = text_clip()
    tokens = P.VisualTokens.for_model(model, layer=1, n=2, deep=True, depth_from=3)
    assert tokens.blocks == [1, 3]  # block 1 appends, block 2 carries them, block 3 swaps in a fresh set
    M.prune(model, M.build_method("random"), keep=KEEP, layer=1)
    vit = P.attach(model, tokens)
    seen, hooks = block_inputs(vit)
    encode(model, images(1))
    for h in hooks:
        h.remove()
    assert not torch.equal(seen[2][:, -2:], tokens.sets[0].detach()[None])
    assert torch.equal(seen[3][:, -2:], tokens.sets[1].detach()[None])


def logits_of(model, tuned, x, tok):
    return model.logit_scale.exp() * F.normalize(model.encode_image(x), dim=-1) @ tuned.classifier(model, tok, NAMES)


def batch_loss(model, tuned, x, y, tok):
    tuned.apply(model)
    try:
        with torch.no_grad():
            return F.cross_entropy(logits_of(model, tuned, x, tok), y).item()
    finally:
        V.unpatch(model)


def test_only_learned_tensors_receive_gradients(model, tok):
    tuned = P.init_tokens(model=model, tokenizer=tok, method=M.build_method("cls_attention"), keep=KEEP, layer=LAYER,
                          visual={"n": 2, "deep": True}, text={"init": "a photo of a"})
    x, y = images(4), torch.tensor([0, 1, 0, 1])

    def backward():
        tuned.apply(model)
        F.cross_entropy(logits_of(model, tuned, x, tok), y).backward()
        V.unpatch(model)

    with P.frozen(model):
        backward()
        P.check_only_tokens_have_grads(model, tuned)
    assert all(p.grad is None for p in model.parameters())
    assert {n for n, p in tuned.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0} == \
        {"visual.sets.0", "visual.sets.1", "text.ctx"}
    assert all(p.requires_grad for p in model.parameters())  # frozen() restores the flags
    # Unfrozen, CLIP itself would learn, and the check says so.
    backward()
    with pytest.raises(RuntimeError, match="frozen CLIP parameters"):
        P.check_only_tokens_have_grads(model, tuned)


def test_tune_lowers_the_loss_and_round_trips(model, tok, tmp_path):
    ds = Blobs(12)
    args = dict(model=model, tokenizer=tok, train_set=ds, classnames=NAMES, method=M.build_method("random"), keep=KEEP,
                layer=LAYER, visual={"n": 2, "deep": True}, text={"init": "a photo of a"}, shots=4, epochs=4,
                lr=0.05, batch_size=4, seed=0, optimizer="adamw")
    tuned = P.tune(**args, log_dir=tmp_path / "live")
    assert not V.is_patched(model)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert tuned.config["n_train"] == 8 and len(tuned.history) == 4
    assert tuned.history[-1] < tuned.history[0]
    assert (tmp_path / "live" / "plots" / "metrics" / "tune" / "loss.tsv").is_file()

    x, y = ds.images[:8], torch.tensor(ds.targets[:8])
    start = P.init_tokens(model=model, tokenizer=tok, method=M.build_method("random"), keep=KEEP, layer=LAYER,
                          visual={"n": 2, "deep": True}, text={"init": "a photo of a"}, seed=0)
    assert batch_loss(model, tuned, x, y, tok) < batch_loss(model, start, x, y, tok) - 0.05

    again = P.tune(**args)
    assert all(torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), again.state_dict().values()))

    path = tuned.save(tmp_path / "out" / "tokens.pt")
    assert [p.name for p in path.parent.iterdir()] == ["tokens.pt"]  # no temp file left behind
    loaded = P.TunedTokens.load(path)
    assert set(loaded.state_dict()) == set(tuned.state_dict()) == {"visual.sets.0", "visual.sets.1", "text.ctx"}
    assert all(torch.equal(tuned.state_dict()[k], v) for k, v in loaded.state_dict().items())
    assert loaded.config == tuned.config and loaded.history == tuned.history
    outs = []
    for t in (tuned, loaded):
        t.apply(model)
        outs.append((encode(model, x), t.classifier(model, tok, NAMES).detach()))
        V.unpatch(model)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("name,cfg,n,deep", [("random", {}, 8, True), ("cls_attention", {"fuse": True}, 4, False),
                                             ("tome", {"r": 3}, 4, False)])
def test_fvcore_counts_the_visual_tokens(name, cfg, n, deep):
    model = tiny_clip(image_size=64, patch_size=8, width=128, layers=6)
    method = method_of(name, cfg)
    dims = V.ViTDims.of(model.visual)
    vit = M.prune(model, method, keep=KEEP, layer=LAYER)
    bare = FL.fvcore_gflops(vit)
    tokens = P.VisualTokens.for_model(vit, layer=vit._clipprune.layer, n=n, deep=deep)
    P.attach(vit, tokens)
    with_tokens = FL.fvcore_gflops(vit)
    tuned = P.TunedTokens(visual=tokens)
    analytic = tuned.analytic_gflops(dims, method, keep=KEEP, layer=LAYER)
    assert with_tokens == pytest.approx(analytic, rel=0.01)
    # The tokens' own share is counted (not hidden inside the 1%).
    share = analytic - FL.analytic_gflops(dims, method, keep=KEEP, layer=LAYER)
    assert share > 0.05 * analytic
    assert with_tokens - bare == pytest.approx(share, rel=0.05)


def test_bad_inputs_are_one_clear_error(model, tok):
    common = dict(model=model, tokenizer=tok, train_set=Blobs(4), classnames=NAMES, keep=KEEP, layer=LAYER, shots=1,
                  epochs=1, lr=0.1, batch_size=2, seed=0)
    with pytest.raises(ClipPruneError, match="ranking"):
        P.tune(**common, method=M.build_method("ranking"), visual={"n": 2}, text=None)
    with pytest.raises(ClipPruneError, match="nothing to learn"):
        P.tune(**common, method=M.build_method("random"), visual={"n": 0}, text=None)
    with pytest.raises(ClipPruneError, match="no option"):
        P.init_tokens(model=model, tokenizer=tok, method=M.build_method("random"), keep=KEEP, layer=LAYER,
                      visual={"tokens": 2})
    tokens = P.VisualTokens.for_model(model, layer=1, n=2)
    with pytest.raises(ClipPruneError, match="methods.prune"):
        P.attach(model, tokens)
    M.prune(model, M.build_method("random"), keep=KEEP, layer=LAYER)
    with pytest.raises(ClipPruneError, match="layer=2"):
        P.attach(model, tokens)


# --------------------------------------------------------------------------------------------------------------
# The IVLP/VPT recipe (tune.augment, tune.warmup_*, tune.schedule, tune.fewshot), against Dassl's own code.

COOP_SPLITS = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "coop_splits"
SPLIT_FILES = {"Caltech101": "split_zhou_Caltech101.json", "OxfordPets": "split_zhou_OxfordPets.json",
               "DTD": "split_zhou_DescribableTextures.json"}


class DasslDatum:
    """The fields of dassl.data.datasets.Datum that generate_fewshot_dataset reads."""

    def __init__(self, impath, label, classname):
        self.impath, self.label, self.classname = impath, label, classname


def dassl_generate_fewshot_dataset(data_source, num_shots):
    """Dassl.pytorch dassl/data/datasets/base_dataset.py, DatasetBase.generate_fewshot_dataset with one data
    source and repeat=True, and split_dataset_by_label, as written there (global `random`)."""
    tracker = defaultdict(list)
    for item in data_source:
        tracker[item.label].append(item)
    dataset = []
    for label, items in tracker.items():
        if len(items) >= num_shots:
            sampled_items = random.sample(items, num_shots)
        else:
            sampled_items = random.choices(items, k=num_shots)
        dataset.extend(sampled_items)
    return dataset


def coop_train_root(root, name, *, shuffle: bool = False):
    """A CoOp DATA root holding `name`'s real split file (its train list shuffled, if asked: the real lists are
    sorted by class, which would hide a draw that visits classes in sorted instead of first-appearance order) and
    an empty file at every train image path. Returns the image dir and the train entries as written."""
    from clipprune.coop import spec_of

    spec = spec_of(name)
    ddir = root / spec.folder
    ddir.mkdir(parents=True)
    table = json.loads((COOP_SPLITS / SPLIT_FILES[name]).read_text())
    if shuffle:
        random.Random(0).shuffle(table["train"])
    (ddir / spec.split_file).write_text(json.dumps(table))
    for rel, _, _ in table["train"]:
        p = ddir / spec.image_dir / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.touch()
    return ddir / spec.image_dir, table["train"]


@pytest.mark.skipif(not COOP_SPLITS.is_dir(), reason="CoOp split files not present (../shared/data/coop_splits)")
@pytest.mark.parametrize("name", list(SPLIT_FILES))
@pytest.mark.parametrize("shuffle", [False, True])
def test_dassl_fewshot_picks_dasslss_images_on_real_coop_splits(tmp_path, name, shuffle):
    """tune.fewshot dassl on the train list as our CoOp loader reads it == Dassl's draw after CoOp's
    set_random_seed(seed), image for image and in order, for CoOp's seeds; shots above a class's size repeat."""
    from clipprune.data import dataset_labels, few_shot_indices, load_dataset

    image_dir, entries = coop_train_root(tmp_path, name, shuffle=shuffle)
    ds = load_dataset(f"coop/{name}", root=tmp_path, split="train").dataset
    labels = dataset_labels(ds)
    state = random.getstate()
    try:
        for seed, shots in ((1, 16), (2, 16), (3, 16), (1, 1), (2, 80)):  # 80: above some classes' size (choices)
            random.seed(seed)  # dassl.utils.set_random_seed; nothing else draws before build_dataset in CoOp
            want = [os.path.join(image_dir, d.impath) for d in dassl_generate_fewshot_dataset(
                [DasslDatum(p, int(y), c) for p, y, c in entries], shots)]
            got = [ds.samples[i][0] for i in few_shot_indices(labels, shots=shots, seed=seed, mode="dassl")]
            assert got == want, (seed, shots)
    finally:
        random.setstate(state)
    assert few_shot_indices(labels, shots=16, seed=1, mode="dassl") != few_shot_indices(labels, shots=16, seed=1)


def dassl_warmup_cosine(optimizer, *, max_epoch, warmup_epoch, cons_lr):
    """Dassl.pytorch dassl/optim/lr_scheduler.py: build_lr_scheduler for LR_SCHEDULER cosine, WARMUP_TYPE constant,
    WARMUP_RECOUNT true (its default), with its ConstantWarmupScheduler; `verbose` dropped (newer torch lacks it)."""
    from torch.optim.lr_scheduler import _LRScheduler

    class _BaseWarmupScheduler(_LRScheduler):
        def __init__(self, optimizer, successor, warmup_epoch, last_epoch=-1):
            self.successor = successor
            self.warmup_epoch = warmup_epoch
            super().__init__(optimizer, last_epoch)

        def step(self, epoch=None):
            if self.last_epoch >= self.warmup_epoch:
                self.successor.step(epoch)
                self._last_lr = self.successor.get_last_lr()
            else:
                super().step(epoch)

    class ConstantWarmupScheduler(_BaseWarmupScheduler):
        def __init__(self, optimizer, successor, warmup_epoch, cons_lr, last_epoch=-1):
            self.cons_lr = cons_lr
            super().__init__(optimizer, successor, warmup_epoch, last_epoch)

        def get_lr(self):
            if self.last_epoch >= self.warmup_epoch:
                return self.successor.get_last_lr()
            return [self.cons_lr for _ in self.base_lrs]

    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, float(max_epoch))
    if warmup_epoch > 0:
        scheduler = ConstantWarmupScheduler(optimizer, scheduler, warmup_epoch, cons_lr)
    return scheduler


def dassl_lrs(*, lr, epochs, steps_per_epoch, warmup_epochs, warmup_lr) -> list[float]:
    """The lr of every step under Dassl, stepped after each epoch's last batch as the CoOp/MaPLe trainers do."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr, momentum=0.9, weight_decay=5e-4)
    sched = dassl_warmup_cosine(opt, max_epoch=epochs, warmup_epoch=warmup_epochs, cons_lr=warmup_lr)
    lrs = []
    for _ in range(epochs):
        lrs += [opt.param_groups[0]["lr"]] * steps_per_epoch
        sched.step()
    return lrs


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # no optimizer steps here
@pytest.mark.parametrize("epochs,warmup,per_epoch", [(5, 1, 3), (4, 0, 2), (3, 2, 1), (1, 1, 4), (50, 1, 7)])
def test_dassl_schedule_matches_dassls_scheduler(epochs, warmup, per_epoch):
    want = dassl_lrs(lr=0.0035, epochs=epochs, steps_per_epoch=per_epoch, warmup_epochs=warmup, warmup_lr=1e-5)
    got = [P.dassl_lr_at(s, lr=0.0035, epochs=epochs, steps_per_epoch=per_epoch, warmup_epochs=warmup, warmup_lr=1e-5)
           for s in range(epochs * per_epoch)]
    # torch's cosine is recursive (each epoch's lr from the last); ours is closed-form: measured at most 1e-15
    # apart (relative) up to 200 epochs.
    assert got == pytest.approx(want, rel=1e-14, abs=0)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_tune_follows_the_dassl_schedule_step_by_step(model, tok, tmp_path):
    """What tune() itself sets, read back from its dvclive log: Dassl's lr at every step."""
    ds = Blobs(12)
    P.tune(model=model, tokenizer=tok, train_set=ds, classnames=NAMES, method=M.build_method("random"), keep=KEEP,
           layer=LAYER, visual={"n": 2}, text=None, shots=4, epochs=3, lr=0.0035, batch_size=3, seed=0,
           warmup_epochs=1, warmup_lr=1e-5, schedule="dassl", weight_decay=5e-4, log_dir=tmp_path / "live")
    rows = (tmp_path / "live" / "plots" / "metrics" / "tune" / "lr.tsv").read_text().splitlines()[1:]
    logged = [float(r.split("\t")[-1]) for r in rows]
    # 8 shots / batch 3 = 3 steps per epoch
    assert logged == pytest.approx(dassl_lrs(lr=0.0035, epochs=3, steps_per_epoch=3, warmup_epochs=1, warmup_lr=1e-5),
                                   rel=1e-14, abs=0)


def test_crop_flip_is_dasslss_train_transform_and_never_touches_evaluation():
    """crop_flip == Dassl's _build_transform_train for INPUT.TRANSFORMS [random_resized_crop, random_flip,
    normalize] (RRCROP_SCALE (0.08, 1), bicubic, CLIP mean/std), draw for draw; the model's preprocess, which
    evaluation uses, is left as it was; "none" is that preprocess itself."""
    from PIL import Image
    from torchvision.transforms import (Compose, InterpolationMode, Normalize, RandomHorizontalFlip,
                                        RandomResizedCrop, ToTensor)

    preprocess = open_clip.image_transform(32, is_train=False)
    image = Image.fromarray(torch.randint(0, 256, (40, 48, 3), generator=torch.Generator().manual_seed(0),
                                          dtype=torch.uint8).numpy())
    before = preprocess(image)
    steps_before = list(preprocess.transforms)
    assert P.train_transform("none", preprocess=preprocess) is preprocess
    train = P.train_transform("crop_flip", preprocess=preprocess)
    dassl = Compose([RandomResizedCrop((32, 32), scale=(0.08, 1.0), interpolation=InterpolationMode.BICUBIC),
                     RandomHorizontalFlip(), ToTensor(),
                     Normalize(mean=open_clip.OPENAI_DATASET_MEAN, std=open_clip.OPENAI_DATASET_STD)])
    outs = []
    for seed in range(4):
        torch.manual_seed(seed)
        a = train(image)
        torch.manual_seed(seed)
        assert torch.equal(a, dassl(image))
        outs.append(a)
    assert a.shape == before.shape and not any(torch.equal(outs[0], o) for o in outs[1:])  # it does augment
    assert list(preprocess.transforms) == steps_before
    for seed in range(3):  # evaluation's transform: unchanged and deterministic whatever the RNG
        torch.manual_seed(seed)
        assert torch.equal(preprocess(image), before)
    with pytest.raises(ClipPruneError, match="augment must be"):
        P.train_transform("flip", preprocess=preprocess)


def test_recipe_params_are_validated_before_any_work(tmp_path):
    from clipprune import config

    for key, value, msg in (("augment", "crop", "'tune.augment' must be one of: none, crop_flip"),
                            ("schedule", "step", "'tune.schedule' must be one of: cosine, dassl"),
                            ("fewshot", "random", "'tune.fewshot' must be one of: per_class, dassl"),
                            ("warmup_epochs", -1, "'tune.warmup_epochs' must be >= 0")):
        with pytest.raises(ClipPruneError, match=msg):
            config.section({"tune": {key: value}}, "tune")
