"""The prunable forward path and the selection methods: equivalence, token counts, determinism, bad input."""
import math

import open_clip
import pytest
import torch

from clipprune import methods as M
from clipprune import predictor as P
from clipprune import vit as V
from clipprune.errors import ClipPruneError
from conftest import encode_pruned, tiny_clip

ALL = [("full", {}), ("random", {}), ("cls_attention", {}), ("cls_attention", {"fuse": True}), ("tome", {"r": 0}), ("ranking", {})]


def images(n=3, size=32, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


run = encode_pruned


def identity_ranking(n_images, n_patches):
    return torch.arange(n_patches).expand(n_images, -1).clone()


def keep_one_methods(vit, n_images):
    """Every registered method at its "prune nothing" setting, with what it needs bound: (label, method, ranking)."""
    n = V.num_patches(vit)
    shuffled = torch.stack([torch.randperm(n, generator=torch.Generator().manual_seed(i)) for i in range(n_images)])
    table = [("full", M.build_method("full"), None),
             ("random", M.build_method("random", seed=3), None),  # picks every patch, in a random order
             ("cls_attention", M.build_method("cls_attention"), None),
             ("cls_attention+fuse", M.build_method("cls_attention", fuse=True), None),
             ("tome", M.build_method("tome", r=0), None),
             ("ranking", M.build_method("ranking"), shuffled),  # a shuffled order: raster order must be restored
             ("predictor", M.PredictorPruning.from_module(P.RankPredictor.for_vit(vit, d=8).eval()), None)]
    assert {m.name for _, m, _ in table} == set(M.METHODS), "a registered method is missing from this table"
    return table


@pytest.fixture
def deterministic():
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(was)


@pytest.mark.parametrize("arch,size", [("tiny", 32), ("ViT-B-16", 64), pytest.param("ViT-B-16", 224, marks=pytest.mark.slow),
                                       pytest.param("ViT-L-14", 56, marks=pytest.mark.slow)])
def test_keep_one_reproduces_open_clip_exactly(arch, size, deterministic):
    """keep = 1.0 runs the patched path and must compute exactly what open_clip computes (fp32, bit for bit)
    for every registered method, pruning at the first, second, a middle and the last block. Every selector
    keeps all patches here, in whatever order it ranks them: only restoring raster order makes it exact."""
    model = tiny_clip() if arch == "tiny" else open_clip.create_model(arch, pretrained=None, force_image_size=size).eval()
    assert model.visual.conv1.weight.dtype == torch.float32
    x = images(2, size)
    with torch.no_grad():
        ref = model.encode_image(x)
    depth = V.depth(model.visual)
    layers = sorted({0, 1, depth // 2, depth - 1})
    for layer in layers:
        for label, method, ranking in keep_one_methods(model.visual, 2):
            if method.name == "cls_attention" and layer == 0:
                continue  # reads the block before the pruning layer: refused at 0 (test_bad_methods...)
            out = run(model, method, x, keep=1.0, layer=layer, ranking=ranking)
            assert torch.equal(out, ref), f"{label} at layer {layer}: max |diff| {(out - ref).abs().max().item():.3g}"


def record_lengths(vit):
    """Tokens entering each block's attention (ln_1) and MLP (ln_2); merged ToMe blocks bypass block.__call__."""
    attn, mlp = {}, {}
    hooks = []
    for i, b in enumerate(vit.transformer.resblocks):
        # Keyed by block: CLS-attention recomputes ln_1 of the block before L on the same tokens.
        hooks.append(b.ln_1.register_forward_pre_hook(lambda m, a, i=i: attn.__setitem__(i, a[0].shape[1])))
        hooks.append(b.ln_2.register_forward_pre_hook(lambda m, a, i=i: mlp.__setitem__(i, a[0].shape[1])))
    return (attn, mlp), hooks


@pytest.mark.parametrize("name,cfg,keep", [("random", {}, 0.6), ("cls_attention", {}, 0.4), ("cls_attention", {"fuse": True}, 0.5),
                                           ("ranking", {}, 0.3), ("tome", {"r": 2.5}, 1.0), ("tome", {"r": 9, "start": 1}, 1.0)])
@pytest.mark.parametrize("image_size", [32, 48])
def test_each_method_prunes_to_the_count_its_setting_implies(name, cfg, keep, image_size):
    model = tiny_clip(image_size=image_size)
    method = M.build_method(name, **cfg)
    dims = V.ViTDims.of(model.visual)
    (attn, mlp), hooks = record_lengths(model.visual)
    out = run(model, method, images(2, image_size), keep=keep, layer=2,
              ranking=identity_ranking(2, dims.n_patches) if name == "ranking" else None)
    for h in hooks:
        h.remove()
    expected = method.token_counts(dims, keep=keep, layer=2)
    # ToMe merges between a block's attention and its MLP; pruning methods change counts between blocks.
    assert [(attn[i], mlp[i]) for i in range(dims.depth)] == expected
    assert out.shape == (2, 32)
    if name != "tome":
        assert attn[dims.depth - 1] == 1 + round(keep * dims.n_patches) + int(cfg.get("fuse", False))


@pytest.mark.parametrize("name,cfg", ALL)
def test_deterministic_and_batch_independent(name, cfg, tiny):
    x = images(4)
    n = V.num_patches(tiny.visual)
    ranking = torch.stack([torch.randperm(n, generator=torch.Generator().manual_seed(i)) for i in range(4)])
    kw = dict(keep=0.5, layer=2)
    a = run(tiny, M.build_method(name, **cfg), x, ranking=ranking if name == "ranking" else None, **kw)
    b = run(tiny, M.build_method(name, **cfg), x, ranking=ranking if name == "ranking" else None, **kw)
    assert torch.equal(a, b)
    if name != "random":  # random draws a fresh mask per batch by design
        for i in range(4):
            one = run(tiny, M.build_method(name, **cfg), x[i : i + 1], ranking=ranking[i : i + 1] if name == "ranking" else None, **kw)
            assert torch.allclose(one, a[i : i + 1], atol=1e-5)


def test_random_masks_differ_across_images_and_follow_the_seed(tiny):
    x = images(1).expand(4, -1, -1, -1)
    out = run(tiny, M.build_method("random", seed=1), x, keep=0.5, layer=1)
    assert not torch.allclose(out[0], out[1])
    again = run(tiny, M.build_method("random", seed=1), x, keep=0.5, layer=1)
    other = run(tiny, M.build_method("random", seed=2), x, keep=0.5, layer=1)
    assert torch.equal(out, again) and not torch.equal(out, other)


def test_patch_copies_no_weights_and_unpatch_restores(tiny):
    vit = tiny.visual
    cls, ptrs = type(vit), [p.data_ptr() for p in tiny.parameters()]
    keys = list(tiny.state_dict())
    M.prune(tiny, M.build_method("cls_attention"), keep=0.5, layer=2)
    assert type(vit) is not cls and isinstance(vit, cls)
    assert [p.data_ptr() for p in tiny.parameters()] == ptrs and list(tiny.state_dict()) == keys
    V.unpatch(tiny)
    assert type(vit) is cls and not V.is_patched(tiny)


def test_cls_attention_matches_multihead_attention_weights(tiny):
    block = tiny.visual.transformer.resblocks[1]
    x = torch.randn(3, 17, 64)
    h = block.ln_1(x)
    _, w = block.attn(h, h, h, need_weights=True, average_attn_weights=True)
    assert torch.allclose(V.cls_attention(block, x), w[:, 0, 1:], atol=1e-6)


def test_ranking_by_cls_attention_order_equals_cls_attention(tiny):
    x = images(3)
    # The elimination order that CLS attention implies: least attended first.
    captured = {}
    block = tiny.visual.transformer.resblocks[1]
    h = block.register_forward_pre_hook(lambda m, i: captured.setdefault("x", i[0]))
    with torch.no_grad():
        tiny.encode_image(x)
    h.remove()
    attn = V.cls_attention(block, captured["x"])
    order = attn.sort(dim=1, descending=True, stable=True).indices.flip(1)
    a = run(tiny, M.build_method("cls_attention"), x, keep=0.4, layer=2)
    b = run(tiny, M.build_method("ranking"), x, keep=0.4, layer=2, ranking=order)
    assert torch.allclose(a, b, atol=1e-6)


def test_ranking_needs_bound_rows(tiny):
    M.prune(tiny, M.build_method("ranking"), keep=0.5, layer=1)
    with pytest.raises(ClipPruneError, match="bound"):
        tiny.encode_image(images(2))
    V.unpatch(tiny)


def test_bound_batches_checks_the_row_count():
    method = M.build_method("ranking")
    loader = [(torch.zeros(2), None), (torch.zeros(1), None)]
    assert len(list(M.bound_batches(loader, method, torch.zeros(3, 4)))) == 2
    with pytest.raises(ClipPruneError, match="4 rows"):
        list(M.bound_batches(loader, method, torch.zeros(4, 4)))


def test_tome_block_without_merges_equals_the_block(tiny):
    block = tiny.visual.transformer.resblocks[0]
    x = torch.randn(2, 17, 64)
    y, size = M.tome_block(block, x, torch.ones(2, 17, 1), 0)
    assert torch.allclose(y, block(x), atol=1e-5) and torch.equal(size, torch.ones(2, 17, 1))


def test_merge_conserves_mass_and_keeps_cls_first():
    x, size = torch.randn(2, 17, 8), torch.rand(2, 17, 1) + 0.5
    y, s = M.merge_wavg(x, size, metric=torch.randn(2, 17, 4), r=5)
    assert y.shape == (2, 12, 8) and s.shape == (2, 12, 1)
    assert torch.allclose((y * s).sum(1), (x * size).sum(1), atol=1e-5)
    assert torch.allclose(s.sum(1), size.sum(1)) and torch.allclose(y[:, 0], x[:, 0], atol=1e-6)


def test_tome_schedule_spreads_fractional_r():
    assert M.tome_schedule(2.5, depth=4) == [2, 3, 2, 3]
    assert M.tome_schedule(3, depth=4, start=2) == [0, 0, 3, 3]
    assert sum(M.tome_schedule(9.6364, depth=12)) == 115


@pytest.mark.parametrize("keep,layer,match", [(0.0, 1, "keep"), (1.5, 1, "keep"), (0.5, -1, "layer"), (0.5, 4, "layer"), (0.5, 0.5, "layer")])
def test_bad_settings_are_one_clear_error(tiny, keep, layer, match):
    with pytest.raises(ClipPruneError, match=match):
        M.prune(tiny, M.build_method("random"), keep=keep, layer=layer)
    assert not V.is_patched(tiny)


def test_bad_methods_are_one_clear_error(tiny):
    with pytest.raises(ClipPruneError, match="unknown method"):
        M.build_method("evit")
    with pytest.raises(ClipPruneError, match="no option"):
        M.build_method("random", fuse=True)
    with pytest.raises(ClipPruneError, match="layer must be >= 1"):
        M.prune(tiny, M.build_method("cls_attention"), keep=0.5, layer=0)
    with pytest.raises(ClipPruneError, match="r must be"):
        M.prune(tiny, M.build_method("tome", r=-1), keep=1.0, layer=0)
    with pytest.raises(ClipPruneError, match="VisionTransformer"):
        M.prune(torch.nn.Linear(2, 2), M.build_method("random"), keep=0.5, layer=0)


# ------------------------------------------------------------------------------------------ ToMe reference
def tome_reference_block(block, x, size, r):
    """One block of ToMe for ONE image, written token by token from the paper's definitions (Bolya et al. 2023,
    §3 and the official tome/patch/timm.py): attention logits q_i.k_j/sqrt(d_head) + log s_j (proportional
    attention); then bipartite soft matching on the keys averaged over heads: tokens alternate into A (even
    positions, CLS first and never merged) and B (odd), each A token's edge is its most cosine-similar B token,
    the r most similar edges merge A into B by size-weighted average; unmerged A tokens (in order) then B
    (in order) follow; then the MLP. Returns (x [N', D], size [N'], merged {a: b})."""
    n, d = x.shape
    heads = block.attn.num_heads
    dh = d // heads
    h = torch.nn.functional.layer_norm(x, (d,), block.ln_1.weight, block.ln_1.bias, block.ln_1.eps)
    wq, wk, wv = block.attn.in_proj_weight.chunk(3)
    bq, bk, bv = block.attn.in_proj_bias.chunk(3)
    q, k, v = h @ wq.T + bq, h @ wk.T + bk, h @ wv.T + bv
    attn_out = torch.zeros_like(x)
    for head in range(heads):
        cols = slice(head * dh, (head + 1) * dh)
        for i in range(n):
            logits = torch.stack([q[i, cols] @ k[j, cols] / math.sqrt(dh) + math.log(size[j]) for j in range(n)])
            p = logits.softmax(0)
            attn_out[i, cols] = sum(p[j] * v[j, cols] for j in range(n))
    x = x + attn_out @ block.attn.out_proj.weight.T + block.attn.out_proj.bias
    key = torch.stack([k[:, hd * dh : (hd + 1) * dh] for hd in range(heads)]).mean(0)  # [N, dh]
    A, B = list(range(0, n, 2)), list(range(1, n, 2))
    cos = lambda i, j: (key[i] @ key[j] / (key[i].norm() * key[j].norm())).item()  # noqa: E731
    edges = []
    for a in A[1:]:  # CLS (position 0) never merges
        best = max(B, key=lambda b: (cos(a, b), -b))
        edges.append((cos(a, best), a, best))
    merged = {a: b for _, a, b in sorted(edges, key=lambda e: (-e[0], e[1]))[:r]}
    groups = [[a] for a in A if a not in merged] + [[b] + [a for a, t in merged.items() if t == b] for b in B]
    size_out = [sum(size[i] for i in g) for g in groups]
    x = torch.stack([sum(size[i] * x[i] for i in g) / s for g, s in zip(groups, size_out)])
    x = x + block.mlp(block.ln_2(x))
    return x, size_out, merged


def hand_made_block(angles):
    """A 4-wide, 2-head block whose every head's key is the direction (cos t, sin t) of a token built from angle t:
    which pairs merge is then known by hand. Queries, values and the MLP stay random."""
    from open_clip.transformer import ResidualAttentionBlock

    torch.manual_seed(0)
    block = ResidualAttentionBlock(4, 2).double().eval()
    with torch.no_grad():
        block.attn.in_proj_weight[4:8] = torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0]] * 2)  # k = LN(x)[:2] per head
        block.attn.in_proj_bias[4:8] = 0
    t = torch.tensor(angles, dtype=torch.float64) * math.pi / 180
    x = torch.stack([t.cos(), t.sin(), -t.cos(), -t.sin()], dim=1)  # zero mean: LN keeps the direction
    return block, x


# Tokens 0..6 (CLS, then A at even positions, B at odd). CLS points almost exactly at token 1: it would be the
# best edge if CLS were not protected. Edges: 2->1 (2 deg), 4->5 (30 deg), 6->3 (60 deg).
SPREAD = [11.5, 12, 10, 260, 100, 130, 200]
# Token 6 moved to 40 deg: 2->1 (2 deg), 6->1 (28 deg), 4->5 (30 deg); two A tokens merge into one B.
SHARED = [11.5, 12, 10, 260, 100, 130, 40]


@pytest.mark.parametrize("angles,r,pairs", [(SPREAD, 1, {2: 1}), (SPREAD, 2, {2: 1, 4: 5}), (SPREAD, 3, {2: 1, 4: 5, 6: 3}),
                                            (SHARED, 2, {2: 1, 6: 1}), (SHARED, 3, {2: 1, 6: 1, 4: 5})])
def test_tome_block_equals_the_papers_definitions_on_a_hand_made_case(angles, r, pairs):
    """Which tokens merge (known by hand and by the reference) and the merged block's output values, with
    sizes left by earlier merges so proportional attention and the size-weighted average both matter."""
    block, x = hand_made_block(angles)
    size = [1.0, 2.0, 1.0, 3.0, 1.0, 1.0, 2.0]
    with torch.no_grad():
        ref_x, ref_size, merged = tome_reference_block(block, x, size, r)
        assert merged == pairs  # the reference agrees with the hand-made geometry
        out, out_size = M.tome_block(block, x[None], torch.tensor(size, dtype=torch.float64)[None, :, None], r)
        # Which tokens merge, read from ToMe's own merge: one-hot tokens come out as their group's weights.
        metric = torch.tensor(angles, dtype=torch.float64).deg2rad()
        metric = torch.stack([metric.cos(), metric.sin()], dim=1)[None]
        onehot, _ = M.merge_wavg(torch.eye(len(angles), dtype=torch.float64)[None], torch.ones(1, len(angles), 1, dtype=torch.float64), metric=metric, r=r)
    groups = sorted(sorted(row.nonzero()[:, 0].tolist()) for row in onehot[0])
    expected = sorted(sorted([b, *[a for a, t in pairs.items() if t == b]]) for b in range(1, 7, 2))
    assert groups == sorted(expected + [[a] for a in range(0, 7, 2) if a not in pairs])
    assert out_size[0, :, 0].tolist() == ref_size
    assert torch.allclose(out[0], ref_x, atol=1e-12, rtol=0), (out[0] - ref_x).abs().max()


def test_tome_forward_equals_the_reference_block_by_block():
    """The whole patched tower (r = 2 every block, sizes carried across blocks, CLS pooled) equals the reference
    chained block by block on open_clip's own embedding and pooling, for a batch of images."""
    model = tiny_clip().double()
    vit = model.visual
    x = images(2).double()
    with torch.no_grad():
        out = run(model, M.build_method("tome", r=2), x, keep=1.0, layer=0)
        for b in range(2):
            h, size = vit._embeds(x[b : b + 1])[0], [1.0] * (V.num_patches(vit) + 1)
            for block in vit.transformer.resblocks:
                h, size, _ = tome_reference_block(block, h, size, 2)
            pooled, _ = vit._pool(h[None])
            assert torch.allclose(out[b], (pooled @ vit.proj)[0], atol=1e-12, rtol=0)
    assert len(size) == V.num_patches(vit) + 1 - 2 * V.depth(vit)
