"""`clipprune`: FLOPs, matched settings and throughput of token-pruning methods on open_clip ViTs.

The DVC stages live in stages/; this is the researcher's command line for quick questions.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

import click
import yaml

from .errors import ClipPruneError

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no download can succeed here; fail in seconds, not a minute


def parse_options(pairs: tuple[str, ...]) -> dict[str, Any]:
    """`-o key=value` pairs as a config dict; values are read as YAML scalars (1, 0.5, true, name)."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ClipPruneError(f"method option {pair!r} is not key=value")
        key, value = pair.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def load_visual(arch: str, image_size: int | None):
    """A random-init visual tower of `arch` (FLOPs and speed do not depend on the weights)."""
    import open_clip

    from . import model as _registers_our_configs  # noqa: F401

    kwargs = {"force_image_size": image_size} if image_size else {}
    root = logging.getLogger()
    level, root.level = root.level, logging.ERROR  # random init is intended: hush open_clip's warning
    try:
        return open_clip.create_model(arch, pretrained=None, **kwargs).visual.eval()
    except RuntimeError as e:
        if "not found" in str(e):
            raise ClipPruneError(f"unknown model {arch!r}; list the names with: python -c 'import open_clip; print(open_clip.list_models())'") from None
        raise
    finally:
        root.level = level


def emit(result: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        for k, v in result.items():
            click.echo(f"{k:>24}: {v}")


model_opt = click.option("--model", "arch", default="ViT-B-16", show_default=True, help="open_clip architecture name.")
size_opt = click.option("--image-size", type=int, default=None, help="Override the input resolution (changes the grid).")
method_opt = click.option("--method", default="random", show_default=True, help="Method name: full, random, cls_attention, tome, ranking.")
opt_opt = click.option("-o", "--opt", "opts", multiple=True, help="Method option key=value, e.g. -o fuse=true or -o r=9.6 (repeatable).")
keep_opt = click.option("--keep", type=float, default=0.6, show_default=True, help="Fraction of patch tokens kept (0, 1].")
layer_opt = click.option("--layer", type=int, default=3, show_default=True, help="Prune at the input of this block (0-based).")
json_opt = click.option("--json", "as_json", is_flag=True, help="Print JSON.")
# Every DVC stage reads its sections from here (dvc.yaml declares which, so DVC knows what each depends on).
params_opt = click.option("--params", "params_path", default="params.yaml", show_default=True, help="The params file.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Token pruning for CLIP ViTs (Patch Ranking, WACV 2025) and its baselines.

    FLOPs are multiply-adds of the image tower at batch 1 (fvcore, with attention counted).
    """


@cli.command()
@model_opt
@size_opt
@method_opt
@opt_opt
@keep_opt
@layer_opt
@json_opt
def flops(arch, image_size, method, opts, keep, layer, as_json):
    """Full and pruned GFLOPs (fvcore and analytic) and their ratio."""
    from .flops import flop_report
    from .methods import build_method

    m = build_method(method, **parse_options(opts))
    vit = load_visual(arch, image_size)
    report = flop_report(vit, m, keep=keep, layer=layer)
    emit({"model": arch, "image_size": vit.image_size[0], "method": method, "keep": keep, "layer": layer,
          **parse_options(opts), **report.as_dict()}, as_json)


@cli.command()
@model_opt
@size_opt
@method_opt
@opt_opt
@keep_opt
@layer_opt
@json_opt
def match(arch, image_size, method, opts, keep, layer, as_json):
    """Each baseline's setting that costs the same GFLOPs as METHOD at (keep, layer), within 1%."""
    from . import vit as V
    from .flops import analytic_gflops, match_setting
    from .methods import build_method

    vit = load_visual(arch, image_size)
    V.check_setting(vit, keep=keep, layer=layer)
    dims = V.ViTDims.of(vit)
    target = analytic_gflops(dims, build_method(method, **parse_options(opts)), keep=keep, layer=layer)
    result = {"model": arch, "target_method": method, "target_gflops": round(target, 4)}
    for name, cfg in [("random", {}), ("cls_attention", {}), ("cls_attention", {"fuse": True}), ("tome", {})]:
        label = name + ("+fuse" if cfg.get("fuse") else "")
        result[label] = match_setting(dims, build_method(name, **cfg), target_gflops=target, layer=layer)
    emit(result, as_json)


@cli.command()
@model_opt
@size_opt
@method_opt
@opt_opt
@keep_opt
@layer_opt
@click.option("--batch", type=int, default=32, show_default=True, help="Images per forward pass.")
@click.option("--repeats", type=int, default=10, show_default=True, help="Timed batches per model (after 2 warm-up).")
@json_opt
def bench(arch, image_size, method, opts, keep, layer, batch, repeats, as_json):
    """images/s of the full and the pruned model, measured alternately in one process."""
    from .bench import throughput
    from .methods import build_method

    if batch < 1 or repeats < 1:
        raise ClipPruneError("--batch and --repeats must be >= 1")
    m = build_method(method, **parse_options(opts))
    vit = load_visual(arch, image_size)
    emit({"model": arch, "method": method, "keep": keep, "layer": layer, **parse_options(opts),
          **throughput(vit, m, keep=keep, layer=layer, batch=batch, repeats=repeats)}, as_json)


def run(command: click.Command) -> None:
    """Run a click command: user errors become one line on stderr and exit status 2, never a traceback."""
    try:
        command(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except ClipPruneError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)


def main() -> None:
    run(cli)


if __name__ == "__main__":
    main()
