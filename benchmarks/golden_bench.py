"""Golden search speed against its FLOP minimum and against the one-candidate-at-a-time reference loop.

    python benchmarks/golden_bench.py --model ViT-B-16 --layer 3 --images 2 --json

FLOP minimum = forward-equivalents (the search's MACs / one full forward's MACs, from the formula) x the
measured time of one full forward per image in the same batch regime (batches of as many tokens as the
search's candidate chunks). Everything is measured in one process, side by side: read the ratios.
"""
from __future__ import annotations

import json
import statistics
import time

import click
import open_clip
import torch

from clipprune import vit as V
from clipprune.golden import GoldenSearch, SearchConfig, forward_equivalents


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@click.command()
@click.option("--model", "arch", default="ViT-B-16", show_default=True)
@click.option("--layer", default=3, show_default=True)
@click.option("--images", default=2, show_default=True, help="Images searched (timed as one batch).")
@click.option("--chunk-tokens", default=4096, show_default=True)
@click.option("--reference-candidates", default=24, show_default=True, help="Candidates timed in the reference loop.")
@click.option("--json", "as_json", is_flag=True)
def main(arch, layer, images, chunk_tokens, reference_candidates, as_json):
    torch.manual_seed(0)
    model = open_clip.create_model(arch, pretrained=None).eval()
    vit = model.visual
    dims = V.ViTDims.of(vit)
    size = vit.image_size[0]
    x = torch.randn(images, 3, size, size)
    cfg = SearchConfig(layer=layer, unit=1, per_round=0, score="similarity", chunk_tokens=chunk_tokens)
    search = GoldenSearch(model, cfg)
    per_chunk = max(1, chunk_tokens // dims.n_patches)
    with torch.inference_mode():
        search.search(x[:1])  # warm-up
        t_search = timed(lambda: search.search(x), 2) / images
        batch = torch.randn(per_chunk, 3, size, size)
        vit(batch)
        t_full = timed(lambda: vit(batch), 3) / per_chunk
        # Reference: each candidate a full forward from pixels at batch 1 (what the tests check against).
        keep = torch.arange(1, dims.n_patches)[None]
        V.apply_spec(vit, V.PruneSpec(layer=layer, n_keep=dims.n_patches - 1, select=lambda t, ctx: V.keep_patches(t, keep - 1)))
        t_ref_candidate = timed(lambda: vit(x[:1]), reference_candidates)
        V.unpatch(vit)
    fwd_eq = forward_equivalents(dims, cfg)
    flop_min = fwd_eq * t_full
    t_ref = t_ref_candidate * dims.n_patches + t_full  # every candidate + the unpruned pass
    result = {"model": arch, "layer": layer, "unit": 1, "mode": "one-shot", "threads": torch.get_num_threads(),
              "images": images, "chunk_tokens": chunk_tokens, "forward_equivalents": round(fwd_eq, 3),
              "full_forward_s_per_image": round(t_full, 5), "flop_minimum_s_per_image": round(flop_min, 4),
              "search_s_per_image": round(t_search, 4), "search_over_flop_minimum": round(t_search / flop_min, 4),
              "reference_s_per_image": round(t_ref, 4), "speedup_over_reference": round(t_ref / t_search, 3)}
    click.echo(json.dumps(result, indent=2) if as_json else "\n".join(f"{k:>26}: {v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
