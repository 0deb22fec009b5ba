"""The predictor's on-disk token cache: exact, read one batch at a time, the same predictor as the in-RAM tensor,
and no file left behind."""
import os
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from clipprune import predictor as P
from clipprune import token_store as T
from clipprune.errors import ClipPruneError
from clipprune.golden import Ranking
from clipprune.token_store import TokenStore

pytestmark = pytest.mark.usefixtures("one_thread")


def filled(data: torch.Tensor, directory, *, chunk: int = 7) -> TokenStore:
    store = TokenStore(rows=len(data), row_shape=data.shape[1:], dtype=data.dtype, directory=directory)
    for s in range(0, len(data), chunk):  # uneven batches, as a DataLoader's last one
        store.append(data[s : s + chunk])
    return store


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_is_exact(tmp_path, dtype):
    data = torch.randn(50, 5, 6, generator=torch.Generator().manual_seed(0)).to(dtype)
    with filled(data, tmp_path) as store:
        assert len(store) == 50 and store.shape == data.shape
        for idx in (torch.randperm(50), torch.tensor([49, 0, 0, 3]), torch.tensor([7])):
            assert store[idx].dtype == dtype and torch.equal(store[idx], data[idx])
        assert torch.equal(store[10:23], data[10:23]) and torch.equal(store[45:99], data[45:])
        with pytest.raises(IndexError):
            store[torch.tensor([50])]
        with pytest.raises(ValueError, match="cannot append"):
            store.append(data[:1])  # full


def synthetic(m, *, n=16, width=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(m, n + 1, width, generator=g)
    return tokens, (tokens[:, 1:] @ torch.randn(width, generator=g)).argsort(dim=1)


@pytest.mark.parametrize("loss", ["listnet", "pairwise"])  # pairwise also draws from the generator per batch
def test_fit_on_a_float32_store_is_fit_on_the_tensor(tmp_path, loss):
    tokens, orders = synthetic(90)
    test_tokens, test_orders = synthetic(40, seed=1)
    kw = dict(orders=orders, keep=0.5, loss=loss, epochs=3, batch_size=16, d=16, lr=3e-3, progress=False)
    ref, ref_hist = P.fit(tokens=tokens, test=(test_tokens, test_orders), **kw)
    with filled(tokens, tmp_path) as store, filled(test_tokens, tmp_path) as test_store:
        ours, hist = P.fit(tokens=store, test=(test_store, test_orders), **kw)
    assert ref.state_dict().keys() == ours.state_dict().keys()
    for k, v in ref.state_dict().items():
        assert torch.equal(v, ours.state_dict()[k]), k
    ref_hist.pop("train_seconds"), hist.pop("train_seconds")
    assert hist == ref_hist and ours.config == ref.config


def peak_growth(fn) -> int:
    """Bytes the process's peak RSS rose by while fn ran (Linux: clear_refs 5 resets the peak to now)."""
    def status(key):
        return int(next(line.split()[1] for line in Path("/proc/self/status").read_text().splitlines()
                        if line.startswith(key + ":"))) * 1024
    Path("/proc/self/clear_refs").write_text("5")
    before = status("VmRSS")
    fn()
    return status("VmHWM") - before


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc/self/clear_refs")
def test_writing_and_training_hold_one_batch_not_the_cache(tmp_path):
    """ViT-B/16-sized rows: a 155 MB cache written batch by batch, a fit epoch and scores over it: the peak RSS
    grows by a few batches' worth, not by the cache (a RAM copy, or a memory map that training touches, would)."""
    rows, shape, batch = 256, (197, 768), 8
    cache_bytes = rows * shape[0] * shape[1] * 4
    orders = torch.stack([torch.randperm(shape[0] - 1, generator=torch.Generator().manual_seed(i)) for i in range(rows)])

    def run(rows):
        with TokenStore(rows=rows, row_shape=shape, directory=tmp_path) as store:
            g = torch.Generator().manual_seed(0)
            for _ in range(rows // batch):
                store.append(torch.randn(batch, *shape, generator=g))
            pred, _ = P.fit(tokens=store, orders=orders[:rows], keep=0.5, loss="listnet", epochs=1, batch_size=batch,
                            d=8, progress=False)
            P.predict_scores(pred, store, batch_size=batch)

    run(2 * batch)  # warm-up: the first use of each kernel pages in code and allocator pools, whatever the size
    grew = peak_growth(lambda: run(rows))
    assert grew < cache_bytes / 4, f"peak RSS grew {grew / 1e6:.0f} MB for a {cache_bytes / 1e6:.0f} MB cache"


def test_layer_tokens_are_the_same_for_any_workers_and_either_sink(tiny, tmp_path):
    images = [(img, 0) for img in torch.randn(37, 3, 32, 32, generator=torch.Generator().manual_seed(0))]
    ram = P.layer_tokens(tiny, images, layer=2, batch_size=8)
    assert ram.shape == (37, 17, 64) and ram.dtype == torch.float32
    assert torch.equal(P.layer_tokens(tiny, images, layer=2, batch_size=8, workers=2), ram)
    with P.layer_tokens(tiny, images, layer=2, batch_size=8, workers=2, out=tmp_path) as store:
        assert store.dtype == torch.float32 and torch.equal(store[torch.arange(37)], ram)


def tiny_world(m, *, seed):
    x = torch.randn(m, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    importance = x.mean(1).unfold(1, 8, 8).unfold(2, 8, 8).mean((-1, -2)).flatten(1)
    ranking = Ranking(meta={"search": {"layer": 2}}, patch_order=importance.argsort(1), unit_order=None,
                      unit_scores=None, labels=torch.zeros(m, dtype=torch.long))
    return [(img, 0) for img in x], ranking


def open_files_under(directory: Path) -> list[str]:
    """Files this process holds open under `directory`, named or not (an unlinked file reads '... (deleted)')."""
    links = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return [link for link in links if link.startswith(str(directory))]


class Failing(list):
    """A dataset whose item `at` cannot be read; records which files were open under `directory` right then."""

    def __init__(self, items, *, at, directory):
        super().__init__(items)
        self.at, self.directory, self.open_then = at, directory, None

    def __getitem__(self, i):
        if i == self.at:
            self.open_then = open_files_under(self.directory)
            raise RuntimeError("unreadable image")
        return super().__getitem__(i)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs Linux /proc")
def test_token_files_are_gone_after_training_and_after_an_error(tiny, tmp_path):
    train, rk = tiny_world(24, seed=0)
    test, test_rk = tiny_world(12, seed=1)
    kw = dict(model=tiny, dataset=train, ranking=rk, layer=2, keep=0.5, epochs=1, batch_size=8, d=8, progress=False,
              tmp_dir=tmp_path)
    P.train_predictor(**kw, test_dataset=test, test_ranking=test_rk)
    assert not list(tmp_path.iterdir()) and not open_files_under(tmp_path)
    broken = Failing(test, at=5, directory=tmp_path)
    with pytest.raises(RuntimeError, match="unreadable image") as error:
        P.train_predictor(**kw, test_dataset=broken, test_ranking=test_rk)
    assert len(broken.open_then) == 2  # the train cache and the test cache being written were there...
    # ...and are gone by the time the caller has the error (whose traceback keeps every frame's locals alive).
    assert error.value and not list(tmp_path.iterdir()) and not open_files_under(tmp_path)


def test_not_enough_disk_is_one_clear_error(tiny, tmp_path, monkeypatch):
    train, rk = tiny_world(8, seed=0)
    monkeypatch.setattr(T.shutil, "disk_usage", lambda path: namedtuple("usage", "total used free")(0, 0, 1000))
    with pytest.raises(ClipPruneError, match=f"GB in {tmp_path} but only 0.0 GB are free.*TMPDIR") as e:
        P.train_predictor(model=tiny, dataset=train, ranking=rk, layer=2, keep=0.5, epochs=1, progress=False,
                          tmp_dir=tmp_path)
    assert "\n" not in str(e.value)
    with pytest.raises(ClipPruneError, match="does not exist"):
        TokenStore(rows=1, row_shape=(2,), directory=tmp_path / "missing")


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_half_precision_caches_half_the_bytes_and_is_recorded(tiny, tmp_path, precision, dtype):
    images, rk = tiny_world(10, seed=0)
    with P.layer_tokens(tiny, images, layer=2, precision=precision, out=tmp_path) as store:
        assert store.dtype == dtype and store.row_bytes == 17 * 64 * dtype.itemsize
        exact = P.layer_tokens(tiny, images, layer=2)
        assert torch.allclose(store[torch.arange(10)].float(), exact, atol=0.05 * exact.abs().max().item())
    pred, _ = P.train_predictor(model=tiny, dataset=images, ranking=rk, layer=2, keep=0.5, epochs=1, d=8,
                                progress=False, precision=precision, tmp_dir=tmp_path)
    assert pred.config.get("precision") == (None if precision == "fp32" else precision)  # fp32 configs as before
