"""Golden search: the fast engine equals a brute-force reference; resumable; 2 processes equal 1."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clipprune import methods as M
from clipprune import vit as V
from clipprune.errors import ClipPruneError
from clipprune.golden import GoldenSearch, SearchConfig, load_ranking, run_search, unit_masks
from conftest import tiny_clip

WORKER = Path(__file__).with_name("golden_worker.py")


def reference(model, image, label, classifier, *, layer, unit, per_round, budget, score):
    """One candidate at a time, each a full forward from pixels through the pruned path: the oracle."""
    units = unit_masks(model.visual.grid_size, unit)
    n_units = units.shape[0]

    def embed(keep):
        idx = torch.tensor([keep], dtype=torch.long)
        V.apply_spec(model, V.PruneSpec(layer=layer, n_keep=len(keep), select=lambda x, ctx: V.keep_patches(x, idx)))
        try:
            return F.normalize(model.encode_image(image[None]), dim=-1)[0]
        finally:
            V.unpatch(model)

    full = F.normalize(model.encode_image(image[None]), dim=-1)[0]
    alive, order, scores = set(range(n_units)), [], []
    n_rank, m = max(1, round(budget * n_units)), per_round or n_units
    while alive:
        rem, sc = sorted(alive), {}
        for u in rem:
            keep = [p for p in range(units.shape[1]) if any(units[a, p] for a in alive if a != u)]
            e = embed(keep)
            heads = classifier if isinstance(classifier, list) else [classifier]  # a list: tasks scored jointly
            probs = [(model.logit_scale.exp() * e @ w).softmax(-1) for w in heads]
            full_probs = [(model.logit_scale.exp() * full @ w).softmax(-1) for w in heads]
            kl = sum((f * (f.log() - p.log())).sum() for f, p in zip(full_probs, probs))
            sc[u] = {"label": probs[0][label], "max": sum(p.max() for p in probs), "similarity": e @ full,
                     "fidelity": -kl}[score].item()
        ranked = sorted(rem, key=lambda u: (-sc[u], u))
        take = min(m, n_rank - len(order))
        if take >= len(rem) or len(order) + take >= n_rank:
            take = len(rem)
        order += ranked[:take]
        scores += [sc[u] for u in ranked[:take]]
        alive -= set(ranked[:take])
    return order, scores


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def f64():
    model = tiny_clip(image_size=40).double()  # 5x5 grid: k=2 leaves smaller units at the edges
    images = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels = torch.tensor([0, 2])
    classifier = F.normalize(torch.randn(32, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64), dim=0)
    return model, images, labels, classifier


@pytest.mark.parametrize("score", ["label", "max", "similarity", "fidelity"])
@pytest.mark.parametrize("unit", [1, 2])
@pytest.mark.parametrize("per_round,budget", [(1, 1.0), (4, 1.0), (0, 1.0), (3, 0.4)])
def test_fast_search_equals_brute_force(f64, score, unit, per_round, budget):
    model, images, labels, classifier = f64
    cfg = SearchConfig(layer=2, unit=unit, per_round=per_round, budget=budget, score=score, chunk_tokens=64)
    with torch.no_grad():
        res = GoldenSearch(model, cfg, classifier=classifier).search(images, labels)
        for b in range(len(images)):
            order, scores = reference(model, images[b], labels[b], classifier, layer=2, unit=unit,
                                      per_round=per_round, budget=budget, score=score)
            assert res.unit_order[b].tolist() == order
            assert torch.allclose(res.unit_scores[b], torch.tensor(scores, dtype=torch.float64), atol=1e-9, rtol=0)


@pytest.mark.parametrize("score", ["max", "fidelity"])
@pytest.mark.parametrize("unit,per_round,budget", [(1, 1, 1.0), (2, 1, 0.5), (2, 0, 1.0)])
def test_joint_search_over_several_tasks_equals_brute_force(f64, score, unit, per_round, budget):
    """Tasks that share their images, given as a list of classifiers, are scored by the sum over them."""
    model, images, labels, classifier = f64
    second = torch.randn(32, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    heads = [classifier, F.normalize(second, dim=0)]
    cfg = SearchConfig(layer=2, unit=unit, per_round=per_round, budget=budget, score=score, chunk_tokens=64)
    with torch.no_grad():
        res = GoldenSearch(model, cfg, classifier=heads).search(images)
        alone = GoldenSearch(model, cfg, classifier=heads[1]).search(images)
        for b in range(len(images)):
            order, scores = reference(model, images[b], None, heads, layer=2, unit=unit, per_round=per_round,
                                      budget=budget, score=score)
            assert res.unit_order[b].tolist() == order
            assert torch.allclose(res.unit_scores[b], torch.tensor(scores, dtype=torch.float64), atol=1e-9, rtol=0)
    assert not torch.allclose(res.unit_scores, alone.unit_scores)  # both tasks count, not just one


def test_patch_order_expands_units_in_elimination_order():
    units = unit_masks((4, 4), 2)
    assert units.sum(1).tolist() == [4, 4, 4, 4]
    assert units[0].nonzero()[:, 0].tolist() == [0, 1, 4, 5]
    edge = unit_masks((5, 5), 2)
    assert edge.shape == (9, 25) and edge.sum(1).tolist() == [4, 4, 2, 4, 4, 2, 2, 2, 1]
    model = tiny_clip()
    res = GoldenSearch(model, SearchConfig(layer=1, unit=2)).search(torch.randn(2, 3, 32, 32))
    for b in range(2):
        expected = [p for u in res.unit_order[b].tolist() for p in units[u].nonzero()[:, 0].tolist()]
        assert res.patch_order[b].tolist() == expected


def test_golden_ranking_drives_the_ranking_method(f64):
    """Pruning with the golden order keeps exactly the search's final survivors (budget = the pruned count)."""
    model, images, labels, classifier = f64
    n = V.num_patches(model.visual)
    res = GoldenSearch(model, SearchConfig(layer=2, per_round=2, score="similarity")).search(images, labels)
    method = M.build_method("ranking")
    M.prune(model, method, keep=0.6, layer=2)
    method.bind(res.patch_order)
    with torch.no_grad():
        out = model.encode_image(images)
    V.unpatch(model)
    n_keep = V.keep_count(0.6, n)
    for b in range(len(images)):
        keep = sorted(res.patch_order[b, n - n_keep :].tolist())
        idx = torch.tensor([keep])
        V.apply_spec(model, V.PruneSpec(layer=2, n_keep=n_keep, select=lambda x, ctx: V.keep_patches(x, idx)))
        with torch.no_grad():
            assert torch.allclose(model.encode_image(images[b : b + 1])[0], out[b], atol=1e-10)
        V.unpatch(model)


def test_bad_search_settings():
    model = tiny_clip()
    for cfg, msg in [(SearchConfig(layer=4), "layer"), (SearchConfig(layer=1, unit=5), "unit"),
                     (SearchConfig(layer=1, per_round=-1), "per_round"), (SearchConfig(layer=1, budget=0), "budget"),
                     (SearchConfig(layer=1, score="logit"), "unknown golden score"), (SearchConfig(layer=1, score="label"), "classifier")]:
        with pytest.raises(ClipPruneError, match=msg):
            GoldenSearch(model, cfg)
    with pytest.raises(ClipPruneError, match="one task's label"):
        GoldenSearch(model, SearchConfig(layer=1, score="label"), classifier=[torch.randn(32, 3), torch.randn(32, 4)])


def worker(out, n=16, nproc=1, **flags):
    """The worker as a process (under torchrun when nproc > 1); flags as in golden_worker.py (slow_from=8, ...)."""
    env = {**os.environ, "PYTHONPATH": str(WORKER.parent.parent), "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, str(WORKER)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", "29533", str(WORKER)]
    args = [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]
    return subprocess.Popen([*cmd, str(out), str(n), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(p, code=0):
    out, err = p.communicate(timeout=240)
    assert p.returncode == code, err[-3000:]


def loaded(log: Path) -> dict[int, list[int]]:
    """{rank: images it loaded, in order} from the worker's --record files."""
    out = {}
    for f in sorted(log.parent.glob(log.name + ".*")):
        if not f.name.removeprefix(log.name + ".").isdigit():
            continue  # not a record (the output beside it)
        pairs = [tuple(map(int, l.split())) for l in f.read_text().splitlines()]
        for rank, i in pairs:
            out.setdefault(rank, []).append(i)
    return out


def shard_ids(shards: Path) -> list[int]:
    """Finished shards: files under their final name (a write in progress has a temp name)."""
    return sorted(int(p.name.split("-")[1]) for p in shards.glob("shard-*.pt"))


SHARD = 4  # the worker's shard_size


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """One uninterrupted single-process run of the worker (16 images, 4 shards), every image loaded once."""
    path = tmp_path_factory.mktemp("clean") / "clean.pt"
    finish(worker(path, record=path.with_suffix(".log")))
    assert loaded(path.with_suffix(".log")) == {0: list(range(16))}
    return path


def test_resume_after_sigkill_reuses_finished_shards_and_is_byte_identical(tmp_path, clean):
    killed = tmp_path / "killed.pt"
    p = worker(killed, slow_from=8, record=tmp_path / "first")  # shards 0 and 1 (images 0..7) are fast, then it crawls
    shards = killed.with_name(killed.name + ".shards")
    deadline = time.time() + 120
    while len(shard_ids(shards)) < 2 and time.time() < deadline:
        time.sleep(0.1)
    p.send_signal(signal.SIGKILL)
    p.wait()
    done = shard_ids(shards)
    assert not killed.exists() and 2 <= len(done) < 4
    finish(worker(killed, record=tmp_path / "rerun"))
    # The rerun loads (so searches) exactly the images of the shards that were not finished, each once.
    assert loaded(tmp_path / "rerun") == {0: [i for i in range(16) if i // SHARD not in done]}
    assert killed.read_bytes() == clean.read_bytes()
    assert not shards.exists()


def test_a_kill_during_a_shard_write_leaves_nothing_a_rerun_trusts(tmp_path, clean):
    """The process dies in the middle of writing shard 2 (after shards 0 and 1 are written): the rerun must not
    take the half-written shard for a finished one, and must recompute it (and only the unfinished shards)."""
    out = tmp_path / "torn.pt"
    finish(worker(out, record=tmp_path / "first", die_writing_from=2 * SHARD), code=-signal.SIGXFSZ)
    assert loaded(tmp_path / "first") == {0: list(range(3 * SHARD))}  # it died after searching shard 2, writing it
    finish(worker(out, record=tmp_path / "rerun"))
    assert loaded(tmp_path / "rerun") == {0: list(range(2 * SHARD, 16))}
    assert out.read_bytes() == clean.read_bytes()


@pytest.mark.slow  # 15-20 s: make test-all and CI run it
def test_two_processes_split_the_work_and_equal_one(tmp_path):
    """Under torchrun with 2 processes every shard is searched by exactly one of them, both work, and the file
    is byte-identical to one process's."""
    finish(worker(tmp_path / "one.pt", n=14, record=tmp_path / "one"))  # 14 images: the last shard is partial
    finish(worker(tmp_path / "two.pt", n=14, nproc=2, record=tmp_path / "two"))
    assert loaded(tmp_path / "one") == {0: list(range(14))}
    by_rank = loaded(tmp_path / "two")
    assert sorted(by_rank) == [0, 1] and sorted(i for imgs in by_rank.values() for i in imgs) == list(range(14))
    owners = {s: {r for r, imgs in by_rank.items() for i in imgs if i // SHARD == s} for s in range(4)}
    assert all(len(o) == 1 for o in owners.values()), owners
    assert (tmp_path / "two.pt").read_bytes() == (tmp_path / "one.pt").read_bytes()
    r = load_ranking(tmp_path / "one.pt")
    assert r.patch_order.shape == (14, 16) and r.meta["search"]["score"] == "label"
    assert sorted(r.patch_order[0].tolist()) == list(range(16))


class Crash(Exception):
    pass


class Counted(torch.utils.data.Dataset):
    """8 fixed images; records what the search loads, and raises at `crash_at` (a run that dies midway)."""

    def __init__(self, crash_at=None):
        self.x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(5))
        self.crash_at, self.seen = crash_at, []

    def __len__(self):
        return 8

    def __getitem__(self, i):
        if i == self.crash_at:
            raise Crash
        self.seen.append(i)
        return self.x[i], i % 3


BASE = dict(cfg=SearchConfig(layer=1, per_round=4, score="label"), meta={"model": "tiny", "model_digest": "a"}, seed=0, head=3)
OTHER = {"score": {"cfg": SearchConfig(layer=1, per_round=4, score="max")},
         "unit": {"cfg": SearchConfig(layer=1, unit=2, per_round=4, score="label")},
         "layer": {"cfg": SearchConfig(layer=2, per_round=4, score="label")},
         "per_round": {"cfg": SearchConfig(layer=1, per_round=2, score="label")},
         "budget": {"cfg": SearchConfig(layer=1, per_round=4, budget=0.5, score="label")},
         "model digest": {"meta": {"model": "tiny", "model_digest": "b"}},
         "weights, same meta": {"seed": 1},
         "classifier, same meta": {"head": 4},
         "precision": {"precision": "bf16"}}


def search_run(tmp_path, dataset, *, cfg, meta, seed, head, precision="fp32", workers=0):
    classifier = F.normalize(torch.randn(32, 3, generator=torch.Generator().manual_seed(head)), dim=0)
    return run_search(model=tiny_clip(seed=seed), dataset=dataset, cfg=cfg, out_path=tmp_path / "r.pt", meta=meta,
                      classifier=classifier, batch_size=2, shard_size=2, progress=False, precision=precision,
                      workers=workers)


def test_worker_processes_change_nothing(tmp_path):
    """DataLoader workers decode the images; the ranking file is byte-identical for any number of them."""
    for w in (0, 2):
        (tmp_path / str(w)).mkdir()
        search_run(tmp_path / str(w), Counted(), **BASE, workers=w)
    assert (tmp_path / "0" / "r.pt").read_bytes() == (tmp_path / "2" / "r.pt").read_bytes()


@pytest.mark.parametrize("changed", ["nothing", *OTHER])
def test_shards_of_another_setting_are_never_reused(tmp_path, changed):
    """A run dies after 2 of 4 shards; the rerun reuses them only if nothing they depend on changed."""
    with pytest.raises(Crash):
        search_run(tmp_path, Counted(crash_at=4), **BASE)
    assert len(list((tmp_path / "r.pt.shards").glob("shard-*.pt"))) == 2
    setting = {**BASE, **OTHER.get(changed, {})}
    rerun = Counted()
    search_run(tmp_path, rerun, **setting)
    assert rerun.seen == ([4, 5, 6, 7] if changed == "nothing" else list(range(8)))
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    search_run(fresh, Counted(), **setting)
    assert (tmp_path / "r.pt").read_bytes() == (fresh / "r.pt").read_bytes()


def test_load_ranking_errors(tmp_path):
    with pytest.raises(ClipPruneError, match="run the golden stage"):
        load_ranking(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a ranking")
    with pytest.raises(ClipPruneError, match="not a clipprune golden ranking"):
        load_ranking(tmp_path / "junk.pt")


@pytest.mark.parametrize("cfg", [SearchConfig(layer=1), SearchConfig(layer=2, unit=2, per_round=1),
                                 SearchConfig(layer=1, per_round=3, budget=0.4, score="max"),
                                 SearchConfig(layer=1, unit=2, per_round=1, budget=0.5, score="fidelity")])
def test_forward_equivalents_count_what_the_search_runs(cfg):
    """The cost model (README's GPU-hours, the benchmark's FLOP minimum) equals the blocks the engine executes."""
    from clipprune.flops import block_macs
    from clipprune.golden import forward_equivalents

    model = tiny_clip()
    dims = V.ViTDims.of(model.visual)
    classifier = F.normalize(torch.randn(32, 3), dim=0)
    search = GoldenSearch(model, cfg, classifier=classifier)
    macs = []
    embed = search.embed
    search.embed = lambda x: macs.append(len(x) * (dims.depth - cfg.layer) * block_macs(x.shape[1], x.shape[1], dims)) or embed(x)
    search.search(torch.randn(1, 3, 32, 32), torch.tensor([1]))
    n = dims.n_patches + 1
    prefix = cfg.layer * block_macs(n, n, dims)
    assert (prefix + sum(macs)) / (dims.depth * block_macs(n, n, dims)) == pytest.approx(forward_equivalents(dims, cfg), rel=1e-9)
