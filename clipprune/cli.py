"""`clipprune`: FLOPs, matched settings and throughput of token-pruning methods on open_clip ViTs.

The DVC stages live in stages/; this is the researcher's command line for quick questions.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import click
import yaml

from .errors import ClipPruneError
from .precision import PRECISIONS
from .runner import run


def parse_options(pairs: tuple[str, ...]) -> dict[str, Any]:
    """`-o key=value` pairs as a config dict; values are read as YAML scalars (1, 0.5, true, name). Their types
    are checked where the method is built (methods.build_method), as for any library caller."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ClipPruneError(f"method option {pair!r} is not key=value (e.g. -o r=9.6)")
        key, value = (t.strip() for t in pair.split("=", 1))
        if key in out:
            raise ClipPruneError(f"method option {key} is given twice (-o {key}=...); give it once")
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            out[key] = value  # not YAML (a path with odd characters): the text itself
    return out


def build_cli_method(name: str, opts: tuple[str, ...]):
    """The method `--method name -o ...` asks for, refusing those the command line cannot run."""
    from .methods import METHODS, build_method, cli_methods

    if name in METHODS and not METHODS[name].runs_alone:
        raise ClipPruneError(f"method {name!r} needs per-image rankings bound at run time, which the command line cannot "
                             f"supply (its FLOPs are random's at the same keep); --method is one of: {', '.join(cli_methods())}")
    return build_method(name, **parse_options(opts))


def parse_image_size(text: str | None) -> tuple[int, int] | None:
    """`--image-size 224` (square) or `224x320` (height x width) as (height, width)."""
    if text is None:
        return None
    parts = text.lower().split("x")
    if len(parts) in (1, 2) and all(p.strip().isdigit() for p in parts):
        h, w = (int(p) for p in parts) if len(parts) == 2 else (int(parts[0]),) * 2
        return h, w
    raise ClipPruneError(f"--image-size {text!r} is not a size: give pixels, e.g. --image-size 224 or 224x320")


def load_visual(arch: str, image_size: tuple[int, int] | None):
    """A random-init visual tower of `arch` (FLOPs and speed do not depend on the weights), at `image_size`
    ((height, width), a positive multiple of the patch size) when given; refused unless prune supports it."""
    import open_clip

    from . import model as _registers_our_configs  # noqa: F401
    from . import vit as V

    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise ClipPruneError(f"unknown model {arch!r}; list the names with: python -c 'import open_clip; print(open_clip.list_models())'")
    if image_size is not None:
        patch = cfg.get("vision_cfg", {}).get("patch_size")
        if not isinstance(patch, int):
            raise ClipPruneError(f"--image-size: {arch} has no patch size (token pruning needs an open_clip VisionTransformer)")
        if not all(s > 0 and s % patch == 0 for s in image_size):
            size = lambda hw: str(hw[0]) if hw[0] == hw[1] else f"{hw[0]}x{hw[1]}"  # noqa: E731
            fix = size([max(patch, round(s / patch) * patch) for s in image_size])
            raise ClipPruneError(f"--image-size {size(image_size)} must be a positive multiple of {arch}'s patch size "
                                 f"{patch} (e.g. --image-size {fix})")
    kwargs = {"force_image_size": image_size} if image_size is not None else {}
    root = logging.getLogger()
    level, root.level = root.level, logging.ERROR  # random init is intended: hush open_clip's warning
    try:
        return V.check_vit(open_clip.create_model(arch, pretrained=None, **kwargs).visual.eval())
    finally:
        root.level = level


def setting_of(arch, image_size, method, opts, keep, layer):
    """(visual tower, method) for a command, checked as `prune` checks them, before any counting or timing."""
    m = build_cli_method(method, opts)  # options first: a typo costs no model build
    vit = load_visual(arch, parse_image_size(image_size))
    m.check(vit, keep=keep, layer=layer)
    return vit, m


def described(arch: str, vit, m, *, keep: float, layer: int) -> dict:
    h, w = vit.image_size
    return {"model": arch, "image_size": h if h == w else [h, w], "method": m.name, "keep": keep, "layer": layer,
            **{k: getattr(m, k) for k in m.options()}}


def emit(result: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        for k, v in result.items():
            click.echo(f"{k:>24}: {v}")


class MethodOption(click.Option):
    """--method, whose help lists what the registry can run from the command line (read when help is shown)."""

    def get_help_record(self, ctx):
        from .methods import cli_methods

        self.help = f"Method: {', '.join(cli_methods())} (options with -o)."
        return super().get_help_record(ctx)


model_opt = click.option("--model", "arch", default="ViT-B-16", show_default=True, help="open_clip architecture name.")
size_opt = click.option("--image-size", default=None,
                        help="Input resolution, a multiple of the patch size: 224, or 224x320 (height x width).")
method_opt = click.option("--method", cls=MethodOption, default="random", show_default=True)
opt_opt = click.option("-o", "--opt", "opts", multiple=True, help="Method option key=value, e.g. -o fuse=true or -o r=9.6 (repeatable).")
keep_opt = click.option("--keep", type=float, default=0.6, show_default=True, help="Fraction of patch tokens kept (0, 1].")
layer_opt = click.option("--layer", type=int, default=3, show_default=True, help="Prune at the input of this block (0-based).")
json_opt = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


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

    vit, m = setting_of(arch, image_size, method, opts, keep, layer)
    report = flop_report(vit, m, keep=keep, layer=layer)
    emit({**described(arch, vit, m, keep=keep, layer=layer), **report.as_dict()}, as_json)


BASELINES = [("random", {}), ("cls_attention", {}), ("cls_attention", {"fuse": True}), ("tome", {"r": 0.0})]


@cli.command()
@model_opt
@size_opt
@method_opt
@opt_opt
@keep_opt
@layer_opt
@json_opt
def match(arch, image_size, method, opts, keep, layer, as_json):
    """Each baseline's setting that costs the same GFLOPs as METHOD at (keep, layer), within 1%.

    A baseline that cannot run at this layer (CLS attention at layer 0) is reported as unavailable, with why."""
    from . import vit as V
    from .flops import analytic_gflops, match_setting
    from .methods import build_method

    vit, m = setting_of(arch, image_size, method, opts, keep, layer)  # refuses what flops and prune refuse
    dims = V.ViTDims.of(vit)
    target = analytic_gflops(dims, m, keep=keep, layer=layer)
    result = {**described(arch, vit, m, keep=keep, layer=layer), "target_gflops": round(target, 4)}
    for name, cfg in BASELINES:
        label = name + ("+fuse" if cfg.get("fuse") else "")
        baseline = build_method(name, **cfg)
        try:
            baseline.check(vit, keep=keep, layer=layer)
        except ClipPruneError as e:
            result[label] = {"unavailable": str(e)}
            continue
        result[label] = match_setting(dims, baseline, target_gflops=target, layer=layer)
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
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
              help="Autocast precision (auto: fp16 on CUDA, fp32 on the CPU).")
@json_opt
def bench(arch, image_size, method, opts, keep, layer, batch, repeats, device, precision, as_json):
    """images/s of the full and the pruned model, measured alternately in one process."""
    from .bench import check_device, throughput

    if batch < 1 or repeats < 1:
        raise ClipPruneError(f"--batch and --repeats must be >= 1, got --batch {batch} --repeats {repeats}")
    dev = check_device(device)  # before the model is built: a missing GPU costs nothing
    vit, m = setting_of(arch, image_size, method, opts, keep, layer)
    emit({**described(arch, vit, m, keep=keep, layer=layer),
          **throughput(vit, m, keep=keep, layer=layer, batch=batch, repeats=repeats, device=dev,
                       precision=precision)}, as_json)


def main() -> None:
    # This command line builds random-init towers only: no download is ever needed, so a stray hub lookup
    # fails in seconds. Set here, not at import: the stages import this package and the paper run must fetch.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run(cli)


if __name__ == "__main__":
    main()
