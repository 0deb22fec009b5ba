"""Bad input, everywhere a user gives it: exit status 2, stderr exactly one line "error: ..." that names the setting
or file, nothing left on disk, and before any work. Method options, the CLI, params files, output directories,
ranking files. (Bad data files are tests/test_data.py's.)"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from clipprune import config
from clipprune import methods as M
from clipprune import vit as V
from clipprune.cli import cli, run
from clipprune.errors import ClipPruneError
from clipprune.golden import FORMAT, load_ranking
from conftest import tiny_clip

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def invoke(command, args: list[str]) -> tuple[int, list[str], str]:
    """`command` through clipprune.cli.run, as the console script and every stage run it: (exit, stderr lines, stdout)."""
    with CliRunner().isolation() as (out, err, _):
        try:
            run(command, args)
            code = 0
        except SystemExit as e:
            code = e.code
    return code, [l for l in err.getvalue().decode().splitlines() if l.strip()], out.getvalue().decode()


def assert_one_line(code: int, lines: list[str], *names: str) -> None:
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for name in names:
        assert name in lines[0], (name, lines[0])


def files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# ----------------------------------------------------------------------------------------- method options
@pytest.mark.parametrize("name,cfg,want", [
    ("random", {"seed": np.int64(3)}, {"seed": 3}),
    ("random", {"seed": torch.tensor(3)}, {"seed": 3}),
    ("cls_attention", {"fuse": np.bool_(True)}, {"fuse": True}),
    ("tome", {"r": np.float32(2.5), "start": torch.tensor(1)}, {"r": 2.5, "start": 1}),
    ("tome", {"r": torch.tensor(4)}, {"r": 4.0}),
    ("tome", {"r": 3}, {"r": 3.0}),  # an int where a number is expected
    ("predictor", {"path": Path("models/p.pt")}, {"path": "models/p.pt"}),
])
def test_numpy_and_torch_scalars_are_options_like_numbers(name, cfg, want):
    m = M.build_method(name, **cfg)
    for k, v in want.items():
        got = getattr(m, k)
        assert got == v and type(got) is type(v), (k, got)  # plain Python values: JSON, isinstance and asdict work


@pytest.mark.parametrize("name,cfg,says", [
    ("random", {"seed": "abc"}, "option seed must be an integer, got 'abc'"),
    ("random", {"seed": True}, "option seed must be an integer, got True"),  # a bool is not an int
    ("random", {"seed": 1.5}, "option seed must be an integer"),
    ("random", {"seed": np.float32(2)}, "option seed must be an integer"),
    ("random", {"sede": 1}, "has no option sede; it takes: seed"),
    ("random", {"_rows": None}, "has no option _rows"),  # private state is not an option
    ("cls_attention", {"fuse": "maybe"}, "option fuse must be true or false, got 'maybe'"),
    ("cls_attention", {"fuse": 1}, "option fuse must be true or false"),
    ("tome", {}, "'tome' needs option r"),  # not silently unpruned
    ("tome", {"r": "9.6"}, "option r must be a number"),
    ("tome", {"r": float("inf")}, "option r must be a finite number"),
    ("tome", {"r": float("nan")}, "option r must be a finite number"),
    ("tome", {"r": -1}, "option r must be >= 0"),
    ("tome", {"r": 2, "start": -1}, "option start must be >= 0"),
    ("tome", {"r": 2, "start": True}, "option start must be an integer"),
    ("predictor", {"path": 3}, "option path must be a string"),
    ("evit", {}, "unknown method 'evit'; choose one of: cls_attention, full, predictor, random, ranking, tome"),
])
def test_bad_method_options_are_one_clear_error(name, cfg, says):
    with pytest.raises(ClipPruneError) as e:
        M.build_method(name, **cfg)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_numpy_and_torch_keep_and_layer_prune_as_python_numbers():
    """np.float32(0.6) and torch.tensor(2) prune exactly as 0.6 and 2 do; True is no layer."""
    model, images = tiny_clip(), torch.randn(2, 3, 32, 32)
    ref = M.encode_pruned(model, M.build_method("cls_attention"), images, keep=0.6, layer=2)
    for keep, layer in ((np.float32(0.6), np.int64(2)), (torch.tensor(0.6), torch.tensor(2)), (np.float64(0.6), 2)):
        assert torch.equal(M.encode_pruned(model, M.build_method("cls_attention"), images, keep=keep, layer=layer), ref)
    for keep, layer, says in ((0.6, True, "layer must be an integer, got True"), (True, 1, "keep must be a number"),
                              (0.6, np.float32(2), "layer must be an integer"), ("0.6", 1, "keep must be a number")):
        with pytest.raises(ClipPruneError, match=says):
            M.prune(model, M.build_method("random"), keep=keep, layer=layer)
        assert not V.is_patched(model)


def test_ranking_is_the_one_method_that_cannot_run_alone():
    assert M.cli_methods() == [n for n in M.METHODS if n != "ranking"]


# ------------------------------------------------------------------------------------------------- the CLI
TINY = ["--model", "clipprune-tiny", "--layer", "1"]  # 64 px, patch 8, 4 blocks: builds in a blink
CLI_BAD = [
    (["flops", *TINY, "-o", "seed=abc"], ["seed", "integer"]),
    (["flops", *TINY, "-o", "seed=true"], ["seed", "integer"]),
    (["flops", *TINY, "--method", "cls_attention", "-o", "fuse=maybe"], ["fuse", "true or false"]),
    (["flops", *TINY, "-o", "sede=1"], ["sede", "it takes: seed"]),
    (["flops", *TINY, "--method", "tome"], ["needs option r"]),
    (["match", *TINY, "--method", "tome"], ["needs option r"]),
    (["flops", *TINY, "--method", "tome", "-o", "r=.inf"], ["option r", "finite"]),
    (["flops", *TINY, "--method", "tome", "-o", "r=1", "-o", "r=2"], ["option r is given twice"]),
    (["flops", *TINY, "--method", "ranking"], ["'ranking'", "random, cls_attention"]),
    (["match", *TINY, "--method", "ranking"], ["'ranking'"]),
    (["flops", *TINY, "--method", "predictor"], ["needs path"]),
    (["match", *TINY, "--method", "predictor"], ["needs path"]),
    # match refuses what flops refuses
    (["flops", *TINY, "--method", "cls_attention", "--layer", "0"], ["layer must be >= 1"]),
    (["match", *TINY, "--method", "cls_attention", "--layer", "0"], ["layer must be >= 1"]),
    (["match", *TINY, "--layer", "4"], ["layer must be in [0, 4)"]),
    (["match", *TINY, "--keep", "0"], ["keep must be in (0, 1]"]),
    (["match", *TINY, "--keep", "nan"], ["keep must be a finite number"]),
    (["flops", "--model", "RN50"], ["VisionTransformer"]),
    (["match", "--model", "RN50"], ["VisionTransformer"]),
    (["match", "--model", "ViT-Nope"], ["unknown model 'ViT-Nope'"]),
    # --image-size: a positive multiple of the patch size, for every command
    *[([cmd, *TINY, "--image-size", size], ["--image-size", "patch size 8"])
      for cmd in ("flops", "match", "bench") for size in ("0", "10", "64x60")],
    (["flops", *TINY, "--image-size", "big"], ["--image-size 'big'"]),
    (["flops", "--model", "RN50", "--image-size", "224"], ["--image-size", "no patch size"]),
    (["bench", *TINY, "--batch", "0"], ["--batch"]),
    (["bench", *TINY, "--device", "tpu"], ["--device 'tpu'", "cpu, cuda or cuda:N"]),
    (["bench", *TINY, "--device", "cuda:x"], ["--device 'cuda:x'"]),
    (["bench", *TINY, "--device", "cuda:99"], ["--device cuda:99"]),  # no GPU: none visible; GPUs: not 100 of them
    *([(["bench", *TINY, "--device", "cuda"], ["--device cuda", "no CUDA GPU", "--device cpu"])]
      if not torch.cuda.is_available() else []),
    (["bench", *TINY, "--precision", "fp8"], ["--precision", "'fp8'", "fp16"]),
    (["bench", *TINY, "--precision", "FP16"], ["--precision"]),
    (["flops", *TINY, "--keep", "abc"], ["--keep"]),  # click's own errors are one line too
    (["flops", *TINY, "--kep", "0.5"], ["--kep"]),
]


@pytest.mark.parametrize("args,names", CLI_BAD, ids=[" ".join(a) for a, _ in CLI_BAD])
def test_cli_bad_input_is_one_line_and_exit_2(args, names):
    code, lines, out = invoke(cli, args)
    assert_one_line(code, lines, *names)
    assert out == ""


def test_match_marks_the_baselines_that_cannot_run_at_the_layer():
    """random at layer 0 is a fine target; CLS attention cannot run there, so its rows say why instead of a number."""
    code, lines, out = invoke(cli, ["match", "--model", "clipprune-tiny", "--layer", "0", "--keep", "0.5", "--json"])
    assert code == 0, lines
    r = yaml.safe_load(out)
    assert "layer must be >= 1" in r["cls_attention"]["unavailable"] and "unavailable" in r["cls_attention+fuse"]
    assert r["random"]["n_keep"] == 32 and r["tome"]["rel_error"] <= 0.01


def test_non_square_inputs_are_counted_as_they_are():
    """64x96 on patch 8 is an 8x12 grid: fvcore (run on a 64x96 input) agrees with the formula for 96 patches."""
    code, lines, out = invoke(cli, ["flops", "--model", "clipprune-tiny", "--image-size", "64x96", "--keep", "0.5",
                                    "--layer", "1", "--json"])
    assert code == 0, lines
    r = yaml.safe_load(out)
    assert r["image_size"] == [64, 96]
    d = 64  # clipprune-tiny: width 64, MLP 256, 4 blocks; by hand: embed + 1 full block + 3 blocks of 1 + 48 tokens
    block = lambda n: 4 * n * d * d + 2 * n * n * d + 2 * n * d * 256  # noqa: E731
    full = 96 * 3 * 64 * d + 4 * block(97)
    assert r["full_gflops_analytic"] == pytest.approx((full + d * 64) / 1e9, abs=1e-4)
    # fvcore counts LayerNorm too, which weighs more at width 64: measured 1.24% (full) and 1.33% (pruned) above the
    # formula here, 1.32% / 1.39% at 64x64. A square 64x64 input would be 37% below the 8x12 grid's formula.
    assert r["pruned_gflops"] == pytest.approx(r["pruned_gflops_analytic"], rel=0.02)
    assert r["full_gflops"] == pytest.approx(r["full_gflops_analytic"], rel=0.02)
    code, lines, out = invoke(cli, ["bench", "--model", "clipprune-tiny", "--image-size", "64x96", "--batch", "1",
                                    "--repeats", "1", "--layer", "1", "--json"])
    assert code == 0 and yaml.safe_load(out)["image_size"] == [64, 96], lines


def test_method_help_lists_what_the_cli_can_run():
    code, lines, out = invoke(cli, ["flops", "--help"])
    assert code == 0
    help_line = " ".join(out.split()).split("--method TEXT")[1].split("-o,")[0]
    assert help_line.strip().startswith("Method: " + ", ".join(M.cli_methods()))
    assert "ranking" not in help_line


@pytest.mark.slow  # 15-20 s: make test-all and CI run it
def test_cli_from_the_shell(tmp_path):
    """The console entry point through a real shell: exit 2, one line, no traceback, nothing written."""
    before = files(tmp_path)
    for cmd, names in (("flops --image-size 10", ["--image-size 10", "patch size 16"]),
                       ("flops -o seed=abc", ["seed"]),
                       ("match --method cls_attention --layer 0", ["layer must be >= 1"])):
        out = subprocess.run(["bash", "-c", f"{sys.executable} -m clipprune.cli {cmd}"], capture_output=True, text=True,
                             cwd=tmp_path, env=ENV, timeout=300)
        assert_one_line(out.returncode, [l for l in out.stderr.splitlines() if l.strip()], *names)
        assert "Traceback" not in out.stderr and out.stdout == ""
    assert files(tmp_path) == before


# ------------------------------------------------------------------------------------------------- params
def default_params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def drop(section):
    return lambda p: p.pop(section)


def setv(section, key, value):
    return lambda p: p[section].__setitem__(key, value)


PARAMS_BAD = [
    (drop("check"), ["section 'check' is missing", "max_drop"]),
    (drop("prune"), ["section 'prune' is missing"]),
    (lambda p: p.__setitem__("check", None), ["section 'check' is empty"]),
    (setv("data", "n_train", -5), ["'data.n_train' must be >= 0, got -5"]),
    (setv("data", "n_test", 0), ["'data.n_test' must be >= 1"]),
    (setv("data", "seed", -1), ["'data.seed' must be >= 0"]),
    (setv("data", "datasets", []), ["'data.datasets' must be a non-empty list"]),
    (setv("data", "datasets", ["synth/shap"]), ["'data.datasets'", "synth/shape, synth/colour", "'synth/shap'"]),
    (setv("data", "datasets", ["synth/shape", "synth/shape"]), ["'data.datasets'", "without repeats"]),
    (setv("pretrain", "batch_size", 0), ["'pretrain.batch_size' must be >= 1"]),
    (setv("pretrain", "text_freeze_frac", 1.5), ["'pretrain.text_freeze_frac' must be in [0, 1]"]),
    (setv("prune", "keep", 0), ["'prune.keep' must be in (0, 1]"]),
    (setv("prune", "keep", 1.2), ["'prune.keep' must be in (0, 1]"]),
    (setv("prune", "keep", "0.6"), ["'prune.keep' must be float"]),
    (setv("prune", "layer", -1), ["'prune.layer' must be >= 0"]),
    (setv("prune", "layer", True), ["'prune.layer' must be int"]),
    (setv("prune", "method", "evit"), ["'prune.method' must be one of"]),
    (setv("prune", "method", "full"), ["'prune.method'"]),
    (lambda p: (p["prune"].update(method="tome"), p["eval"]["methods"].remove("tome")), ["'prune.method'", "'eval.methods'"]),
    (lambda p: p["eval"]["methods"].remove("full"), ["'eval.methods' must include full"]),
    (setv("golden", "score", "labels"), ["'golden.score' must be one of: label, max, similarity, fidelity"]),
    (setv("golden", "unit", 0), ["'golden.unit' must be >= 1"]),
    (setv("golden", "per_round", -1), ["'golden.per_round' must be >= 0"]),
    (setv("golden", "budget", 0.0), ["'golden.budget' must be in (0, 1]"]),
    (setv("golden", "budget", 1.5), ["'golden.budget' must be in (0, 1]"]),
    (setv("golden", "shard_size", 100), ["'golden.shard_size' must be a multiple of 'golden.batch_size'"]),
    (setv("golden", "n_train", 0), ["'golden.n_train' must be >= 1"]),
    (setv("predictor", "loss", "kl"), ["'predictor.loss' must be one of: topset_kl, listnet, pairwise"]),
    (setv("predictor", "epochs", 0), ["'predictor.epochs' must be >= 1"]),
    (setv("tune", "shots", 0), ["'tune.shots' must be >= 1"]),
    (setv("tune", "visual_tokens", -1), ["'tune.visual_tokens' must be >= 0"]),
    (setv("eval", "batch_size", 0), ["'eval.batch_size' must be >= 1, got 0"]),
    (setv("eval", "methods", ["full", "evit"]), ["'eval.methods'", "one of: full"]),
    (setv("eval", "sweep_keeps", [0.5, 1.2]), ["'eval.sweep_keeps'", "in (0, 1]"]),
    (setv("eval", "sweep_keeps", [0.0, 0.5]), ["'eval.sweep_keeps'"]),
    (setv("eval", "sweep_keeps", []), ["'eval.sweep_keeps' must be a non-empty list"]),
    (setv("eval", "sweep_methods", ["golden", "oracle"]), ["'eval.sweep_methods'"]),
    (setv("eval", "overlay_images", 0), ["'eval.overlay_images' must be >= 1"]),
    (setv("check", "max_drop", -0.1), ["'check.max_drop' must be >= 0"]),
    (setv("check", "tolerance", -1), ["'check.tolerance' must be >= 0"]),
]


@pytest.mark.parametrize("edit,names", PARAMS_BAD, ids=[str(n[0]) for _, n in PARAMS_BAD])
def test_bad_params_are_refused_at_load(tmp_path, edit, names):
    params = default_params()
    edit(params)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ClipPruneError) as e:
        config.load(*config.SECTIONS, path=tmp_path / "params.yaml")
    assert all(n in str(e.value) for n in names) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("profile", ["params.yaml", "profiles/paper.yaml", "profiles/cifar10.yaml"])
def test_every_shipped_profile_passes_every_rule(profile):
    loaded = config.load(*config.SECTIONS, path=ROOT / profile)
    assert len(loaded) == len(config.SECTIONS)


@pytest.mark.parametrize("text,where", [
    ("prune:\n  keep: [0.6\n  layer: 2\n", ":3:"),  # an unclosed list: the problem is found on line 3
    ("prune:\n  keep: 0.6\n   layer: 2\n", ":3:"),
    ("prune:\n  keep: 0.6\n  keep: 0.5\n", ":3:3"),  # YAML keeps the last silently; we refuse
    ("- prune\n- check\n", "must be a mapping of sections"),
])
def test_yaml_errors_give_line_and_column(tmp_path, text, where):
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ClipPruneError) as e:
        config.load("prune", path=tmp_path / "params.yaml")
    assert where in str(e.value) and "\n" not in str(e.value), str(e.value)


def write_params(cwd: Path, edit=None) -> Path:
    params = default_params()
    if edit:
        edit(params)
    (cwd / "params.yaml").write_text(yaml.safe_dump(params))
    return cwd / "params.yaml"


def stage_main(stage: str):
    import importlib

    return importlib.import_module(f"stages.{stage}").main


@pytest.mark.parametrize("stage,edit,names", [
    ("check", drop("check"), ["section 'check' is missing"]),  # a gate without thresholds must not pass
    ("flops", drop("prune"), ["section 'prune' is missing"]),
    ("data", setv("data", "datasets", ["synth/shap"]), ["synth/shap", "synth/shape, synth/colour"]),
    ("data", setv("data", "n_train", -5), ["'data.n_train'"]),
    ("evaluate", setv("eval", "batch_size", 0), ["'eval.batch_size'"]),
    ("golden", setv("golden", "per_round", -1), ["'golden.per_round'"]),
    ("sweep", setv("eval", "sweep_keeps", [0.5, 1.2]), ["'eval.sweep_keeps'"]),
    ("check", lambda p: p["prune"].update(method="golden") or p["eval"]["methods"].remove("golden"), ["'prune.method'"]),
])
def test_stage_refuses_bad_params_before_any_work(tmp_path, monkeypatch, stage, edit, names):
    write_params(tmp_path, edit)
    monkeypatch.chdir(tmp_path)
    before = files(tmp_path)
    code, lines, _ = invoke(stage_main(stage), ["--params", "params.yaml"])
    assert_one_line(code, lines, *names)
    assert files(tmp_path) == before


@pytest.mark.slow  # 15-20 s: make test-all and CI run it
def test_stage_from_the_shell(tmp_path):
    """python -m stages.<x> through a real shell: the missing section and the unwritable output are one line each."""
    write_params(tmp_path, drop("prune"))
    (tmp_path / "reports").write_text("a file where the reports directory should be")
    before = files(tmp_path)
    for stage, names in (("flops", ["section 'prune' is missing"]), ("check --no-against-git", ["section 'prune'"])):
        out = subprocess.run(["bash", "-c", f"{sys.executable} -m stages.{stage}"], capture_output=True, text=True,
                             cwd=tmp_path, env=ENV, timeout=300)
        assert_one_line(out.returncode, [l for l in out.stderr.splitlines() if l.strip()], *names)
    write_params(tmp_path)
    out = subprocess.run(["bash", "-c", f"{sys.executable} -m stages.sweep"], capture_output=True, text=True,
                         cwd=tmp_path, env=ENV, timeout=300)
    assert_one_line(out.returncode, [l for l in out.stderr.splitlines() if l.strip()], "cannot write reports/")
    assert files(tmp_path) == before


# ------------------------------------------------------------------------------------------------ outputs
WRITERS = ["data", "pretrain", "golden", "predictor", "tune", "flops", "evaluate", "sweep", "report"]


@pytest.mark.parametrize("stage", WRITERS)
def test_unwritable_outputs_are_one_line_before_any_work(tmp_path, monkeypatch, stage):
    """A file where an output directory must go: the stage names it at once. Before any work: no model, data or
    ranking exists here, and the stage says so only after its outputs pass (the writability check comes first)."""
    write_params(tmp_path, setv("data", "root", "data/synth"))
    for blocker in ("reports", "data"):
        (tmp_path / blocker).write_text("not a directory")
    monkeypatch.chdir(tmp_path)
    before = files(tmp_path)
    code, lines, _ = invoke(stage_main(stage), ["--params", "params.yaml"])
    assert_one_line(code, lines, "cannot write", "data is not a directory" if stage == "data" else "reports")
    assert files(tmp_path) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through any permission bits")
def test_read_only_directory_is_one_line(tmp_path, monkeypatch):
    write_params(tmp_path)
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports").chmod(0o555)
    monkeypatch.chdir(tmp_path)
    try:
        code, lines, _ = invoke(stage_main("flops"), ["--params", "params.yaml"])
    finally:
        (tmp_path / "reports").chmod(0o755)
    assert_one_line(code, lines, "cannot write reports/", "not writable")


def test_writable_outputs_pass_and_create_nothing(tmp_path):
    from clipprune.io import check_writable

    check_writable(tmp_path / "a" / "b", tmp_path)
    assert files(tmp_path) == set()


# ----------------------------------------------------------------------------------------------- rankings
def ranking_file(path: Path, order: torch.Tensor) -> Path:
    n = len(order)
    torch.save({"meta": {"format": FORMAT}, "patch_order": order, "unit_order": order, "unit_scores": torch.zeros(order.shape),
                "labels": torch.zeros(n, dtype=torch.int64)}, path)
    return path


@pytest.mark.parametrize("make,n_patches,says", [
    (lambda: torch.stack([torch.arange(16), torch.arange(16).roll(1)]), 9, "ranks 16 patches per image, the model has 9"),
    (lambda: torch.stack([torch.arange(16), torch.arange(1, 17)]), 16, "image 1 has indices outside [0, 16)"),
    (lambda: torch.stack([torch.arange(16), torch.arange(16) - 1]), None, "image 1 has indices outside [0, 16)"),
    (lambda: torch.stack([torch.arange(16), torch.zeros(16, dtype=torch.int64)]), 16, "image 1 has repeated patches"),
    (lambda: torch.arange(16), 16, "patch_order has shape (16,)"),
])
def test_bad_rankings_are_one_line(tmp_path, make, n_patches, says):
    path = ranking_file(tmp_path / "r.pt", make())
    with pytest.raises(ClipPruneError) as e:
        load_ranking(path, n_patches=n_patches)
    assert says in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_good_ranking_loads():
    order = torch.stack([torch.randperm(16, generator=torch.Generator().manual_seed(i)) for i in range(3)])
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        assert torch.equal(load_ranking(ranking_file(Path(d) / "r.pt", order), n_patches=16).patch_order, order)
