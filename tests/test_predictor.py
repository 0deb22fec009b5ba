"""Phase II predictor: its cost, its losses, its fidelity metrics, training, saving, and the `predictor` method."""
import warnings
from pathlib import Path

import pytest
import torch
from scipy.stats import kendalltau

from clipprune import flops as F
from clipprune import methods as M
from clipprune import predictor as P
from clipprune import vit as V
from clipprune.errors import ClipPruneError
from clipprune.golden import Ranking
from conftest import encode_pruned, tiny_clip

VIT_B16 = V.ViTDims(n_patches=196, width=768, heads=12, depth=12, mlp_width=3072, patch=16, out_dim=512)


pytestmark = pytest.mark.usefixtures("one_thread")


def fvcore_gmacs(module, x):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fvcore traces with the deprecated torch.jit
        from fvcore.nn import FlopCountAnalysis

        fca = FlopCountAnalysis(module.eval(), x).set_op_handle(**F.HANDLES, **{k: None for k in F._IGNORED})
        return fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False).total() / 1e9


def random_orders(b, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n, generator=g) for _ in range(b)])


# --------------------------------------------------------------------------------------------------- cost
@pytest.mark.parametrize("reduce", ["linear", "avgpool"])
def test_predictor_costs_under_one_percent_of_pruned_vit_b16(reduce):
    pred = P.RankPredictor(seq_len=197, width=768, d=64, reduce=reduce)
    counted = fvcore_gmacs(pred, torch.zeros(1, 197, 768))
    pruned = F.analytic_gflops(VIT_B16, M.build_method("random"), keep=0.6, layer=3)
    assert pruned == pytest.approx(12.25, rel=0.002)  # test_flops checks this formula against fvcore
    assert counted <= 0.01 * pruned
    assert pred.macs() / 1e9 == pytest.approx(counted, rel=0.01)
    # The method's extra MACs are the predictor's, so every FLOP figure includes it.
    with_pred = F.analytic_gflops(VIT_B16, M.PredictorPruning.from_module(pred), keep=0.6, layer=3)
    assert with_pred - pruned == pytest.approx(pred.macs() / 1e9, rel=1e-9)


def test_fvcore_of_the_pruned_path_includes_the_predictor():
    model = tiny_clip(image_size=64, patch_size=8, width=128, layers=6)  # as test_flops: formula within 1%
    pred = P.RankPredictor.for_vit(model.visual, d=16)
    method = M.PredictorPruning.from_module(pred)
    r = F.flop_report(model.visual, method, keep=0.5, layer=2)
    plain = F.flop_report(model.visual, M.build_method("random"), keep=0.5, layer=2)
    assert r.pruned_gflops == pytest.approx(r.pruned_analytic, rel=0.01)
    assert r.pruned_gflops - plain.pruned_gflops == pytest.approx(pred.macs() / 1e9, rel=0.01)


# ------------------------------------------------------------------------------------------------- losses
@pytest.mark.parametrize("keep", [0.6, 0.3])
def test_topset_budget_follows_keep(keep):
    n = 196
    order = random_orders(4, n)
    logits = P.topset_logits(order, keep=keep)
    n_keep = round(keep * n)
    kept = logits == 0
    assert kept.sum(1).tolist() == [n_keep] * 4
    for b in range(4):  # the keep set is the tail of the elimination order (the most important)
        assert set(kept[b].nonzero()[:, 0].tolist()) == set(order[b, n - n_keep :].tolist())
        # pruned logits: -5 - 0.1 * (position in the most-important-first list): earliest pruned lowest
        assert logits[b, order[b, 0]].item() == pytest.approx(-5 - 0.1 * (n - 1))
        assert logits[b, order[b, n - n_keep - 1]].item() == pytest.approx(-5 - 0.1 * n_keep)
    target = logits.softmax(1)
    assert (target[kept] > 0.99 / n_keep).all() and target[~kept].sum(0).max() < 1e-3


@pytest.mark.parametrize("keep", [0.6, 0.3])
def test_topset_loss_is_minimised_by_the_golden_keep_set(keep):
    n = 40
    order = random_orders(3, n, seed=1)
    n_keep = round(keep * n)
    golden = P.topset_logits(order, keep=keep)
    assert P.topset_kl(golden, order, keep=keep).item() == pytest.approx(0.0, abs=1e-6)
    # Scores that put exactly the golden keep set on top beat the same scores with one keep/prune swap...
    ranked = M.ranking_scores(order) * 0.5
    swapped = ranked.clone()
    a, b = order[:, n - n_keep], order[:, n - n_keep - 1]  # least important kept, most important pruned
    rows = torch.arange(3)
    swapped[rows, a], swapped[rows, b] = ranked[rows, b], ranked[rows, a]
    assert P.topset_kl(ranked, order, keep=keep) < P.topset_kl(swapped, order, keep=keep)
    # ...and among hard "this set is kept" scores, the golden set beats every other set of the same size.
    def hard(sets):
        return torch.zeros(3, n).scatter_(1, sets, 20.0)

    best = P.topset_kl(hard(order[:, n - n_keep :]), order, keep=keep)
    for s in range(5):
        other = random_orders(3, n, seed=10 + s)[:, :n_keep]
        assert best < P.topset_kl(hard(other), order, keep=keep)


def synthetic(m, *, n=16, width=32, seed=0):
    """Tokens whose patch importance is a fixed linear function of the token: learnable by construction."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(m, n + 1, width, generator=g)
    w = torch.randn(width, generator=torch.Generator().manual_seed(99))
    importance = tokens[:, 1:] @ w
    return tokens, importance.argsort(dim=1)  # least important first


@pytest.mark.parametrize("loss", ["topset_kl", "listnet", "pairwise"])
def test_loss_decreases_on_a_synthetic_ranking_problem(loss):
    tokens, orders = synthetic(256)
    test = synthetic(64, seed=1)
    pred, hist = P.fit(tokens=tokens, orders=orders, keep=0.5, loss=loss, epochs=8, batch_size=32, d=16, lr=3e-3,
                       test=test, progress=False)  # 64 steps
    # ListNet is a cross-entropy: its floor is the target's entropy (the same for every image), not 0.
    floor = P.listnet(M.ranking_scores(orders[:1]) / 15 / 0.2, orders[:1], keep=0.5).item() if loss == "listnet" else 0.0
    assert len(hist["loss"]) == 8 and hist["loss"][-1] - floor < 0.6 * (hist["loss"][0] - floor)
    assert hist["test"][-1]["kendall_tau"] > hist["test"][0]["kendall_tau"]
    assert hist["test"][-1]["topk_overlap"] > 0.75  # chance is 0.5
    assert hist["lr"][0] == 3e-3 and hist["lr"][-1] < hist["lr"][0]


def test_bad_loss_names_and_options():
    with pytest.raises(ClipPruneError, match="unknown predictor loss"):
        P.get_loss("hinge")
    with pytest.raises(ClipPruneError, match="no option temperature"):
        P.get_loss("pairwise", temperature=1.0)
    P.get_loss("listnet", temperature=0.5)


def test_pairwise_sampling_follows_the_seed():
    pred, order = torch.randn(4, 30), random_orders(4, 30)
    loss = [P.pairwise(pred, order, keep=0.5, n_pairs=50, gen=torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert loss[0] == loss[1] and loss[0] != loss[2]
    # Golden importance scores with spacing >= margin satisfy every pair.
    assert P.pairwise(M.ranking_scores(order), order, keep=0.5).item() == 0.0


# ----------------------------------------------------------------------------------------------- fidelity
def test_kendall_tau_matches_scipy():
    g = torch.Generator().manual_seed(0)
    for n in (5, 49, 196):
        x, y = torch.randn(6, n, generator=g), torch.randn(6, n, generator=g)
        y[0] = x[0] + 0.1 * y[0]  # a strongly correlated row as well
        ours = P.kendall_tau(x, y, chunk=4)
        ref = [kendalltau(x[i].numpy(), y[i].numpy()).statistic for i in range(6)]
        assert torch.allclose(ours, torch.tensor(ref, dtype=torch.float32), atol=1e-6)


def test_topk_overlap_by_hand():
    order = torch.tensor([[0, 1, 2, 3, 4]])  # golden keep set at keep 0.6 (3 of 5): {2, 3, 4}
    assert P.topk_overlap(M.ranking_scores(order), order, keep=0.6).item() == 1.0
    pred = torch.tensor([[5.0, 0.0, 4.0, 1.0, 3.0]])  # predicted keep set: {0, 2, 4}: 2 of 3 agree
    assert P.topk_overlap(pred, order, keep=0.6).item() == pytest.approx(2 / 3)
    f = P.fidelity(pred, order, keep=0.6)
    assert f["topk_overlap"] == pytest.approx(2 / 3)
    assert f["kendall_tau"] == pytest.approx(kendalltau(pred[0].numpy(), [0, 1, 2, 3, 4]).statistic)
    orders = random_orders(8, 49)
    same = P.fidelity(M.ranking_scores(orders) * 3 + 1, orders, keep=0.3)
    assert same == {"topk_overlap": 1.0, "kendall_tau": pytest.approx(1.0)}
    assert P.fidelity(-M.ranking_scores(orders), orders, keep=0.3)["topk_overlap"] == 0.0


# ---------------------------------------------------------------------------------------------- the method
class GoldenStub(torch.nn.Module):
    """Returns the golden scores of the batch it was given: a perfect predictor."""

    def __init__(self, order):
        super().__init__()
        self.order = order

    def forward(self, x):
        assert x.shape[0] == len(self.order)
        return M.ranking_scores(self.order)


@pytest.mark.parametrize("keep", [0.6, 0.3])
def test_a_perfect_predictor_reproduces_the_golden_oracle(tiny, keep):
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    order = random_orders(4, V.num_patches(tiny.visual), seed=3)
    ours = encode_pruned(tiny, M.PredictorPruning.from_module(GoldenStub(order)), x, keep=keep, layer=2)
    oracle = encode_pruned(tiny, M.build_method("ranking"), x, keep=keep, layer=2, ranking=order)
    other = encode_pruned(tiny, M.build_method("ranking"), x, keep=keep, layer=2, ranking=order.flip(1))
    assert torch.equal(ours, oracle) and not torch.allclose(ours, other)


def test_cached_tokens_are_what_the_selector_sees(tiny):
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    seen = []
    V.apply_spec(tiny, V.PruneSpec(layer=2, n_keep=8, select=lambda t, ctx: seen.append(t) or V.keep_patches(t, torch.zeros(len(t), 8, dtype=torch.long) + torch.arange(8))))
    with torch.no_grad():
        tiny.encode_image(x)
    V.unpatch(tiny)
    cached = P.layer_tokens(tiny, [(img, 0) for img in x], layer=2, batch_size=2)
    assert cached.shape == (5, 17, 64) and torch.allclose(cached, seen[0], atol=1e-6)


def tiny_world(model, m, *, seed):
    """Images and a golden ranking that the layer-2 tokens can explain (importance = a patch's mean pixel)."""
    x = torch.randn(m, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    importance = x.mean(1).unfold(1, 8, 8).unfold(2, 8, 8).mean((-1, -2)).flatten(1)  # [m, 16] raster order
    ranking = Ranking(meta={"search": {"layer": 2}}, patch_order=importance.argsort(1), unit_order=None,
                      unit_scores=None, labels=torch.zeros(m, dtype=torch.long))
    return [(img, 0) for img in x], ranking


def test_train_save_load_and_prune(tiny, tmp_path):
    train, rk = tiny_world(tiny, 96, seed=0)
    test, test_rk = tiny_world(tiny, 32, seed=1)
    kw = dict(model=tiny, dataset=train, ranking=rk, layer=2, keep=0.5, loss="topset_kl", epochs=6, lr=3e-3,
              weight_decay=1e-4, batch_size=16, d=16, seed=0, test_dataset=test, test_ranking=test_rk, progress=False)
    pred, hist = P.train_predictor(**kw, log_dir=tmp_path / "live")
    again, _ = P.train_predictor(**kw)
    for k, v in pred.state_dict().items():  # deterministic for a seed
        assert torch.equal(v, again.state_dict()[k]), k
    # A random-init CLIP and 96 images: learning shows, quality is what the synthetic test checks.
    assert hist["loss"][-1] < hist["loss"][0] and hist["test"][-1]["kendall_tau"] > hist["test"][0]["kendall_tau"]
    assert hist["test"][-1]["topk_overlap"] > 0.55  # chance 0.5
    assert (tmp_path / "live" / "metrics.json").is_file()
    assert (tmp_path / "live" / "plots" / "metrics" / "test" / "kendall_tau.tsv").is_file()

    path = P.save_predictor(tmp_path / "pred.pt", pred, pred.config)
    loaded = P.load_predictor(path)
    tokens = P.layer_tokens(tiny, test, layer=2)
    assert torch.equal(P.predict_scores(loaded, tokens), P.predict_scores(pred, tokens))
    assert loaded.config == pred.config and loaded.config["layer"] == 2 and loaded.arch == pred.arch
    assert set(torch.load(path, weights_only=True)) == {"format", "arch", "config", "state_dict"}  # no CLIP in it

    x = torch.stack([img for img, _ in test])
    by_path = encode_pruned(tiny, M.build_method("predictor", path=str(path)), x, keep=0.5, layer=2)
    by_module = encode_pruned(tiny, M.PredictorPruning.from_module(pred), x, keep=0.5, layer=2)
    by_order = encode_pruned(tiny, M.build_method("ranking"), x, keep=0.5, layer=2,
                             ranking=P.predict_scores(pred, tokens).sort(dim=1, stable=True).indices)
    assert torch.equal(by_path, by_module) and torch.allclose(by_path, by_order, atol=1e-6)
    with pytest.raises(ClipPruneError, match="layer 2, not 1"):
        M.prune(tiny, M.build_method("predictor", path=str(path)), keep=0.5, layer=1)
    assert not V.is_patched(tiny)


def test_bad_paths_and_shapes_are_one_clear_error(tiny, tmp_path):
    for method, msg in [(M.build_method("predictor"), "needs path"),
                        (M.build_method("predictor", path=str(tmp_path / "missing.pt")), "run the predictor stage"),
                        (M.build_method("predictor", path=str(tmp_path / "junk.pt")), "not a clipprune predictor")]:
        (tmp_path / "junk.pt").write_bytes(b"junk")
        with pytest.raises(ClipPruneError, match=msg) as e:
            M.prune(tiny, method, keep=0.5, layer=2)
        assert "\n" not in str(e.value)
        assert not V.is_patched(tiny)
    wrong = M.PredictorPruning.from_module(P.RankPredictor(seq_len=65, width=64))
    with pytest.raises(ClipPruneError, match="65 tokens"):
        M.prune(tiny, wrong, keep=0.5, layer=2)
    with pytest.raises(ClipPruneError, match="avgpool"):
        P.RankPredictor(seq_len=17, width=64, d=48, reduce="avgpool")
    ds, rk = tiny_world(tiny, 8, seed=0)
    with pytest.raises(ClipPruneError, match="8 rows but the dataset has 7"):
        P.train_predictor(model=tiny, dataset=ds[:7], ranking=rk, layer=2, keep=0.5, epochs=1, progress=False)
    with pytest.raises(ClipPruneError, match="searched at layer 2, not 1"):
        P.train_predictor(model=tiny, dataset=ds, ranking=rk, layer=1, keep=0.5, epochs=1, progress=False)


def test_transferred_rows_use_the_source_predictor_and_tokens(tiny, tmp_path, monkeypatch):
    """predictor.transfer_from: every dataset also gets predictor@<source> and predictor+tokens@<source>, built on the
    source's predictor file and pruned-model tokens, at the same GFLOPs as its own predictor row; off when null."""
    from clipprune.config import DataParams, EvalParams, GoldenParams, PredictorParams, PruneParams
    from clipprune.experiment import eval_labels, setup_gflops, setups_for

    monkeypatch.chdir(tmp_path)  # the pipeline's models/ is relative to the repository root
    data = DataParams(datasets=["synth/shape", "synth/colour"])
    golden = GoldenParams(score="label")  # one ranking, and one predictor, per task
    for key, seed in (("synth-shape", 0), ("synth-colour", 1)):
        torch.manual_seed(seed)
        pred = P.RankPredictor(seq_len=17, width=64, d=16)
        P.save_predictor(Path("models/predictors") / f"{key}.pt", pred, {"layer": 2, "keep": 0.5})
    eval_p = EvalParams(methods=["full", "predictor", "predictor+tokens"])
    assert eval_labels(eval_p, data, PredictorParams()) == ("full", "predictor", "predictor+tokens")
    labels = eval_labels(eval_p, data, PredictorParams(transfer_from="synth/shape"))
    assert labels[3:] == ("predictor@shape", "predictor+tokens@shape")
    dims = V.ViTDims.of(tiny.visual)
    rows = setups_for("synth/colour", data=data, golden=golden, prune=PruneParams(keep=0.5, layer=2), dims=dims,
                      labels=labels, transfer_from="synth/shape")
    assert rows["predictor"].method.path == str(Path("models/predictors/synth-colour.pt"))
    assert rows["predictor@shape"].method.path == str(Path("models/predictors/synth-shape.pt"))
    assert rows["predictor@shape"].tokens is None
    assert rows["predictor+tokens@shape"].method.path == str(Path("models/predictors/synth-shape.pt"))
    assert rows["predictor+tokens@shape"].tokens == Path("models/tokens/synth-shape-pruned.pt")
    assert rows["predictor+tokens"].tokens == Path("models/tokens/synth-colour-pruned.pt")
    assert rows["predictor@shape"].describe()["trained_on"] == "synth/shape"
    assert "trained_on" not in rows["predictor"].describe()  # the default rows' settings are as before
    assert setup_gflops(rows["predictor@shape"], dims) == setup_gflops(rows["predictor"], dims)
    with pytest.raises(ClipPruneError, match="'predictor.transfer_from' is 'coop/ImageNet', which is not in data.datasets"):
        eval_labels(eval_p, data, PredictorParams(transfer_from="coop/ImageNet"))
