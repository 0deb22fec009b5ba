"""Peak host RAM of the predictor stage's data path against the number of ranked images: TokenStore vs in-RAM.

    python benchmarks/predictor_memory.py --sizes 2000 8000 --old-sizes 1000 2000

Every run is a fresh process that caches synthetic ViT-B/16 block-3 tokens [M, 197, 768] float32, produced 64
images at a time as layer_tokens produces them (never all at once), then runs the real `fit` on them (a small
predictor, --epochs epochs of random mini-batches, test scores every epoch on a fixed 256-image test cache):
  new: the TokenStore, on disk under --dir, read one mini-batch at a time;
  old: the previous path, the batches kept in a list and torch.cat into one tensor, fit on that tensor.
Peak = the child's VmHWM (its peak resident set, file-backed mapped pages included). The slope between two sizes,
extrapolated to Food-101's 50,500 train images, is what the stage would need there; the old path's is also
computed from the tensor sizes (M x 197 x 768 x 4 bytes, twice that at the torch.cat).
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import torch

SHAPE = (197, 768)  # ViT-B/16: CLS + 14 x 14 patches, width 768
ROW_BYTES = SHAPE[0] * SHAPE[1] * 4
FOOD101 = 50_500  # Food-101 train images (the paper ranks all of them)
TEST = 256  # test images: the same small cache for every size and path
BATCH = 64  # layer_tokens' batch


def status(key: str) -> int:
    """A /proc/self/status figure in bytes (VmRSS: now; VmHWM: the peak so far)."""
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key + ":"))
    return int(line.split()[1]) * 1024


def batches(m: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for s in range(0, m, BATCH):
        yield torch.randn(min(BATCH, m - s), *SHAPE, generator=g)


def run_child(path: str, m: int, epochs: int, directory: str) -> dict:
    """One measured run; returns its figures (printed as JSON for the parent)."""
    from clipprune.predictor import fit
    from clipprune.token_store import TokenStore

    base = status("VmRSS")  # python + torch + clipprune, before any token exists
    t0 = time.perf_counter()
    orders, test_orders = (torch.stack([torch.randperm(SHAPE[0] - 1, generator=torch.Generator().manual_seed(i))
                                        for i in range(n)]) for n in (m, TEST))
    if path == "new":
        train = TokenStore(rows=m, row_shape=SHAPE, directory=directory)
        test = TokenStore(rows=TEST, row_shape=SHAPE, directory=directory)
        for store, n, seed in ((train, m, 0), (test, TEST, 1)):
            for x in batches(n, seed):
                store.append(x)
    else:  # the previous layer_tokens: a list of CPU batches, then one torch.cat (two copies at its peak)
        train, test = (torch.cat([x.float().cpu() for x in batches(n, seed)]) for n, seed in ((m, 0), (TEST, 1)))
    cached = time.perf_counter()
    fit(tokens=train, orders=orders, keep=0.6, loss="listnet", epochs=epochs, batch_size=32, d=8,
        test=(test, test_orders), progress=False)
    return {"path": path, "images": m, "base_rss": base, "peak_rss": status("VmHWM"),
            "cache_s": round(cached - t0, 1), "fit_s": round(time.perf_counter() - cached, 1)}


def measure(path: str, m: int, epochs: int, directory: str, threads: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", path, "--images", str(m), "--epochs", str(epochs),
                          "--dir", directory, "--threads", str(threads)], capture_output=True, text=True)
    if out.returncode:
        raise click.ClickException(f"the {path} run at {m} images failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.splitlines()[-1])


def slope(a: dict, b: dict) -> float:
    """Peak bytes per extra image between two runs."""
    return (b["peak_rss"] - a["peak_rss"]) / (b["images"] - a["images"])


@click.command()
@click.option("--sizes", type=int, nargs=2, default=(2000, 8000), show_default=True,
              help="Train images for the two TokenStore runs (their slope is extrapolated).")
@click.option("--old-sizes", type=int, nargs=2, default=(1000, 2000), show_default=True,
              help="Train images for the two in-RAM runs.")
@click.option("--epochs", default=2, show_default=True)
@click.option("--dir", "directory", default=tempfile.gettempdir(), show_default=True, help="Where the stores go.")
@click.option("--threads", default=1, show_default=True, help="torch threads per run (a shared machine: 1).")
@click.option("--child", type=click.Choice(["new", "old"]), default=None, hidden=True)
@click.option("--images", type=int, default=0, hidden=True)
@click.option("--json", "as_json", is_flag=True)
def main(sizes, old_sizes, epochs, directory, threads, child, images, as_json):
    if child is not None:  # the measured process
        torch.set_num_threads(threads)
        click.echo(json.dumps(run_child(child, images, epochs, directory)))
        return
    new = [measure("new", m, epochs, directory, threads) for m in sorted(sizes)]
    old = [measure("old", m, epochs, directory, threads) for m in sorted(old_sizes)]
    gb = 1e9
    s_new, s_old = slope(*new), slope(*old)
    result = {
        "runs": new + old,
        "new_peak_ratio": round(new[1]["peak_rss"] / new[0]["peak_rss"], 3),  # ~1: flat
        "new_bytes_per_image": round(s_new),
        "old_bytes_per_image": round(s_old),  # ~2 x ROW_BYTES (list + torch.cat)
        "row_bytes": ROW_BYTES,
        "food101_old_computed_gb": {"tensor": round(FOOD101 * ROW_BYTES / gb, 1), "cat_peak": round(2 * FOOD101 * ROW_BYTES / gb, 1)},
        "food101_old_extrapolated_gb": round((old[1]["peak_rss"] + s_old * (FOOD101 - old[1]["images"])) / gb, 1),
        # A slope within noise of 0 (or below) extrapolates as flat: RSS cannot shrink with more images.
        "food101_new_extrapolated_gb": round((new[1]["peak_rss"] + max(s_new, 0) * (FOOD101 - new[1]["images"])) / gb, 2),
        "food101_new_disk_gb": round(FOOD101 * ROW_BYTES / gb, 1),
    }
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    for r in result["runs"]:
        click.echo(f"{r['path']:>4} M={r['images']:>6}: peak RSS {r['peak_rss'] / gb:6.2f} GB (imports {r['base_rss'] / gb:.2f}), "
                   f"cache {r['cache_s']} s, fit {r['fit_s']} s")
    click.echo(f"new: peak at M={new[1]['images']} / at M={new[0]['images']} = {result['new_peak_ratio']}, "
               f"{s_new / 1e3:+.1f} kB per image (a row is {ROW_BYTES / 1e3:.0f} kB)")
    click.echo(f"old: {s_old / 1e3:+.1f} kB per image measured ({2 * ROW_BYTES / 1e3:.0f} kB computed: list + torch.cat)")
    click.echo(f"Food-101 ({FOOD101} images), peak host RAM: old {result['food101_old_extrapolated_gb']} GB extrapolated "
               f"({result['food101_old_computed_gb']['tensor']} GB tensor, {result['food101_old_computed_gb']['cat_peak']} GB "
               f"at the torch.cat, computed); new {result['food101_new_extrapolated_gb']} GB extrapolated "
               f"(+ {result['food101_new_disk_gb']} GB of disk)")


if __name__ == "__main__":
    main()
