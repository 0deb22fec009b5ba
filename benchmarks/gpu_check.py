"""The prepared GPU check: what `make gpu-check` runs on a lent GPU box, in one command, within a time budget.

    python benchmarks/gpu_check.py                    # CUDA if there is one, else the small mode
    python benchmarks/gpu_check.py --device cpu       # the small mode (what tests/test_gpu_check.py runs)

In order: a. the machine (device, versions, GPU count); b. `bench` of ViT-B-16 (random init) at batch 256 in fp16
for full, random, cls_attention, tome and a random-weight predictor, every row at the predictor's GFLOPs (keep 0.6
at block 3, matched as experiment.setups_for matches them); c. golden search seconds per image at the paper's
search settings on 64 random images against its FLOP minimum; d. the paper smoke run (tests/test_paper_smoke.py);
e. the golden stage under torchrun (NCCL on every GPU) against one process; f. one JSON line with every figure.
Small mode (no CUDA, or --device cpu): clipprune-tiny, small batches, few images, gloo with 2 processes, no smoke
run; under 2 minutes on 2 cores. Each part is skipped with a note, rather than overrun, once --budget-s is spent.
Progress lines are printed as it goes, so a run cut short still shows how far it got.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random weights only: a hub lookup would be a bug, fail fast
if __name__ == "__main__":  # bars are noise in a log (progress lines are ours); tqdm reads this when imported
    os.environ.setdefault("TQDM_DISABLE", "1")

import click  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # clipprune from this checkout; test_dist's project builder

from clipprune import config  # noqa: E402
from clipprune import vit as V  # noqa: E402
from clipprune.bench import check_device, device_name, throughput, timed  # noqa: E402
from clipprune.errors import ClipPruneError  # noqa: E402
from clipprune.precision import PRECISIONS, autocast, resolve  # noqa: E402
from clipprune.runner import run  # noqa: E402

PARTS = ("machine", "bench", "golden", "smoke", "dist")
ROWS = ("full", "random", "cls_attention", "tome", "predictor")
# What each part imports beyond torch and open_clip: a GPU box without a network may lack some (README, GPU check).
NEEDS = {"bench": ("fvcore",), "golden": (), "smoke": ("pytest", "fvcore", "clip_benchmark", "sklearn", "dvclive",
                                                     "pandas", "seaborn"),
         "dist": ("pytest", "yaml", "clip_benchmark", "sklearn")}
BASE_DEPTH = 12  # ViT-B-16's blocks: the paper's layer is scaled to other depths (block 3 of 12 -> 1 of 4)


class Clock:
    """Seconds since the start and what is left of the budget; prints progress lines."""

    def __init__(self, budget_s: float):
        self.t0, self.budget_s = time.perf_counter(), budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def say(self, msg: str) -> None:
        print(f"gpu-check [{self.elapsed():6.1f}s] {msg}", flush=True)


def sizes(small: bool) -> dict:
    """What each part runs on: the paper's scale on CUDA, a few seconds' worth of each on the CPU."""
    if small:
        return {"arch": "clipprune-tiny", "batch": 8, "repeats": 10, "warmup": 3, "images": 16,
                "precision": "auto", "nproc": 2, "backend": "gloo", "predictor_d": 16}
    return {"arch": "ViT-B-16", "batch": 256, "repeats": 10, "warmup": 3, "images": 64, "precision": "fp16",
            "nproc": torch.cuda.device_count(), "backend": "nccl", "predictor_d": None}


# ------------------------------------------------------------------------------------------------- a. machine
def machine(dev: torch.device) -> dict:
    import open_clip

    cuda = dev.type == "cuda"
    return {"device": str(dev), "device_name": device_name(dev), "torch": torch.__version__,
            "open_clip": open_clip.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "nccl": nccl_version() if cuda else None,
            "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
            "cpu_threads": torch.get_num_threads()}


def nccl_version() -> str | None:
    try:
        v = torch.cuda.nccl.version()
        return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    except Exception:  # a build without NCCL: part e. will say so
        return None


# --------------------------------------------------------------------------------------------------- b. bench
def matched_rows(vit, predictor, *, keep: float, layer: int) -> tuple[float, dict]:
    """(target GFLOPs, {row: (method, keep)}): every row at the predictor's GFLOPs, as experiment.setups_for
    matches them (the target capped at the full model; random/cls_attention by keep count, ToMe by its r)."""
    from clipprune.flops import analytic_gflops, match_setting
    from clipprune.methods import build_method

    dims = V.ViTDims.of(vit)
    target = min(analytic_gflops(dims, predictor, keep=keep, layer=layer),
                 analytic_gflops(dims, build_method("full"), keep=1.0, layer=layer))
    rows = {"full": (build_method("full"), 1.0)}
    for name in ("random", "cls_attention"):
        rows[name] = (build_method(name), match_setting(dims, build_method(name), target_gflops=target, layer=layer)["keep"])
    r = match_setting(dims, build_method("tome", r=0.0), target_gflops=target, layer=layer)["r"]
    rows["tome"] = (build_method("tome", r=r), 1.0)
    rows["predictor"] = (predictor, keep)
    return target, rows


def bench(clip, *, dev: torch.device, size: dict, keep: float, layer: int, d: int, clock: Clock, reserve_s: float) -> dict:
    from clipprune.flops import analytic_gflops
    from clipprune.methods import PredictorPruning
    from clipprune.predictor import RankPredictor

    vit = clip.visual
    torch.manual_seed(0)
    predictor = PredictorPruning.from_module(RankPredictor.for_vit(vit, d=d).to(dev).eval())
    target, rows = matched_rows(vit, predictor, keep=keep, layer=layer)
    dims = V.ViTDims.of(vit)
    out = {"model": size["arch"], "batch": size["batch"], "precision": resolve(size["precision"], dev), "keep": keep,
           "layer": layer, "predictor_d": d, "target_gflops": round(target, 4), "rows": {}}
    per_row = None
    for name, (method, k) in rows.items():
        if per_row is not None and clock.left() - reserve_s < per_row:
            out["rows"][name] = {"skipped": f"budget: {clock.left():.0f} s left, a row takes ~{per_row:.0f} s"}
            clock.say(f"b. bench {name}: skipped (budget)")
            continue
        t0 = time.perf_counter()
        r = throughput(vit, method, keep=k, layer=layer, batch=size["batch"], repeats=size["repeats"],
                       warmup=size["warmup"], device=dev, precision=size["precision"])
        per_row = time.perf_counter() - t0
        gflops = analytic_gflops(dims, method, keep=k, layer=layer)
        out["rows"][name] = {
            **{o: getattr(method, o) for o in method.options() if o != "path"}, "keep": k,
            "n_keep": V.keep_count(k, dims.n_patches), "gflops": round(gflops, 5), "gflops_fvcore": r["pruned_gflops"],
            "rel_error": round(abs(gflops - target) / target, 5) if name != "full" else None,
            **{f: r[f] for f in ("full_img_per_s", "pruned_img_per_s", "measured_speedup", "flops_speedup",
                                 "measured_over_flops")}}
        clock.say(f"b. bench {name:<13} measured {r['measured_speedup']:.3f}x, FLOPs bound {r['flops_speedup']:.3f}x "
                  f"(ratio {r['measured_over_flops']:.3f}); {r['pruned_img_per_s']:.0f} img/s pruned, "
                  f"{gflops:.4f} GFLOPs vs target {target:.4f}")
    return out


# -------------------------------------------------------------------------------------------------- c. golden
def golden(clip, *, dev: torch.device, size: dict, golden_params, layer: int, clock: Clock, reserve_s: float) -> dict:
    """Golden search s/image on random images and a random classifier, against forward_equivalents x the time of
    one full forward's blocks per image (what forward_equivalents counts; batches of as many images as a candidate
    chunk holds), measured here, alternately with the search."""
    import torch.nn.functional as F

    from clipprune.golden import GoldenSearch, SearchConfig, forward_equivalents

    g = golden_params
    cfg = SearchConfig(layer=layer, unit=g.unit, per_round=g.per_round, budget=g.budget, score=g.score,
                       chunk_tokens=g.chunk_tokens)
    vit, dims = clip.visual, V.ViTDims.of(clip.visual)
    gen = torch.Generator().manual_seed(0)
    n_classes = 100  # a random 100-way zero-shot head: the label score reads one class probability
    classifier = F.normalize(torch.randn(clip.visual.output_dim, n_classes, generator=gen), dim=0).to(dev)
    h, w = vit.image_size
    images = torch.randn(size["images"], 3, h, w, generator=gen)
    labels = torch.randint(0, n_classes, (size["images"],), generator=gen)
    search = GoldenSearch(clip, cfg, classifier=classifier)
    precision = resolve(size["precision"], dev)
    n_units = search.units.shape[0]
    per_chunk = max(1, min(g.chunk_tokens // (dims.n_patches + 1), g.batch_size * n_units))
    fwd_batch = torch.randn(per_chunk, 3, h, w, generator=gen).to(dev)
    with torch.inference_mode(), autocast(precision, dev):
        tokens = vit._embeds(fwd_batch)  # the blocks' input: embedding and projection are not in forward_equivalents
        blocks = lambda: V.run_blocks(vit, tokens)  # noqa: E731
        x0 = images[: g.batch_size].to(dev)
        warm = timed(lambda: search.search(x0, labels[: g.batch_size].to(dev)), device=dev)  # kernels, allocator
        clock.say(f"c. golden warm-up batch of {len(x0)}: {warm:.1f} s")
        blocks()
        # Search batches alternate with full forwards (bench's protocol), so the machine's noise hits both alike.
        done, spent, fwd = 0, 0.0, []
        for s in range(0, len(images), g.batch_size):
            if done and clock.left() - reserve_s < (spent + sum(fwd)) / done * g.batch_size:
                clock.say(f"c. golden: budget reached after {done} images")
                break
            x, y = images[s : s + g.batch_size].to(dev), labels[s : s + g.batch_size].to(dev)
            spent += timed(lambda: search.search(x, y), device=dev)
            fwd += [timed(blocks, device=dev) for _ in range(2)]
            done += len(x)
    fwd_eq = forward_equivalents(dims, cfg)
    t_fwd = statistics.median(fwd) / per_chunk
    s_img, minimum = spent / done, fwd_eq * t_fwd
    clock.say(f"c. golden {s_img:.4f} s/image over {done} images; FLOP minimum {minimum:.4f} s/image "
              f"({fwd_eq:.1f} forward-equivalents x {t_fwd * 1e3:.3f} ms of blocks), ratio {s_img / minimum:.2f}")
    return {"model": size["arch"], "precision": precision, "images": done, "batch_size": g.batch_size,
            "layer": layer, "score": g.score, "unit": g.unit, "per_round": g.per_round, "budget": g.budget,
            "chunk_tokens": g.chunk_tokens, "n_classes": n_classes, "forward_equivalents": round(fwd_eq, 3),
            "forward_batch": per_chunk, "forward_blocks_s_per_image": round(t_fwd, 7), "s_per_image": round(s_img, 5),
            "flop_minimum_s_per_image": round(minimum, 5), "over_flop_minimum": round(s_img / minimum, 4)}


# -------------------------------------------------------------------------------------- subprocesses, streamed
GLOG = re.compile(r"[IWE]\d{4} \d\d:\d\d:\d\d")  # torch.distributed's log prefix (LOGLEVEL=INFO)


def stream(cmd: list[str], *, cwd: Path, env: dict, timeout: float, clock: Clock, tag: str) -> tuple[int | None, str]:
    """Run `cmd`, echoing its lines as progress; kill its whole process group at `timeout`. (exit code or None, log)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own group: torchrun's workers die with it on a timeout
    lines: list[str] = []

    def pump():
        for line in proc.stdout:
            lines.append(line)
            if line.strip() and not GLOG.match(line):  # torchrun's agent chatter is kept in the log, not echoed
                clock.say(f"{tag} | {line.rstrip()[:200]}")

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
        code = None
    reader.join(timeout=5)
    return code, "".join(lines)


def child_env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **extra}


# --------------------------------------------------------------------------------------------------- d. smoke
def smoke(*, clock: Clock, reserve_s: float) -> dict:
    """tests/test_paper_smoke.py with CLIPPRUNE_SMOKE=1: every stage of the paper profile, here on the GPU."""
    t0 = time.perf_counter()
    code, log = stream([sys.executable, "-m", "pytest", "tests/test_paper_smoke.py", "-q", "-rs", "-p", "no:cacheprovider"],
                       cwd=ROOT, env=child_env(CLIPPRUNE_SMOKE="1"), timeout=clock.left() - reserve_s, clock=clock,
                       tag="d. smoke")
    seconds = round(time.perf_counter() - t0, 1)
    if code is None:
        return {"passed": False, "seconds": seconds, "error": f"timed out at its {seconds:.0f} s share of --budget-s"}
    skipped = [l.split(": ", 1)[-1].strip() for l in log.splitlines() if l.startswith("SKIPPED")]
    if code == 0 and skipped and " passed" not in log:
        return {"skipped": skipped[0], "seconds": seconds}
    return {"passed": code == 0, "seconds": seconds, **({} if code == 0 else {"error": log.strip()[-1500:]})}


# ---------------------------------------------------------------------------------------------------- e. dist
PROBE = """import os, torch, torch.distributed as dist
backend = os.environ["PROBE_BACKEND"]
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
dev = torch.device(f"cuda:{os.environ['LOCAL_RANK']}") if backend == "nccl" else torch.device("cpu")
if backend == "nccl":
    torch.cuda.set_device(dev)
    dist.init_process_group("nccl", device_id=dev)  # even for a world of 1: this is what NCCL has to do
else:
    dist.init_process_group("gloo")
t = torch.ones(1, device=dev) * (rank + 1)
dist.all_reduce(t)
dist.barrier()
print(f"probe rank {rank} world {world} {dist.get_backend()} all_reduce {t.item():.0f}", flush=True)
dist.destroy_process_group()
"""


def dist_check(*, dev: torch.device, size: dict, clock: Clock, reserve_s: float) -> dict:
    """The golden stage on N processes (torchrun; NCCL on N GPUs, gloo on 2 CPU processes) is byte-identical to
    one plain process. One GPU: torchrun with 1 process (init_from_env starts no process group for a world of 1,
    so a separate probe initialises NCCL and all-reduces, to check NCCL itself on this box)."""
    from test_dist import NPROC_ENV, env, fresh_copy, outputs, tiny_golden_project

    nproc, backend = size["nproc"], size["backend"]
    out = {"backend": backend, "nproc": nproc}
    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-dist-"))
    try:
        t0 = time.perf_counter()
        tiny_golden_project(tmp / "project")
        clock.say(f"e. dist: tiny project built ({time.perf_counter() - t0:.1f} s)")
        plain = fresh_copy(tmp / "project", tmp / "plain")
        code, log = stream([sys.executable, "-m", "stages.golden", "--no-progress"], cwd=plain, env=env(),
                           timeout=clock.left() - reserve_s, clock=clock, tag="e. golden x1")
        if code != 0:
            return {**out, "identical": False, "error": f"one process: exit {code}: {log[-1500:]}"}
        many = fresh_copy(tmp / "project", tmp / "many")
        if nproc >= 2:  # what dvc.yaml runs: stages.launch starts torchrun with N workers
            cmd = [sys.executable, "-m", "stages.launch", "golden", "--no-progress"]
        else:  # stages.launch would run 1 process in place: ask torchrun for it, to run its path
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                   "-m", "stages.golden", "--no-progress"]
        code, log = stream(cmd, cwd=many, env=env(**{NPROC_ENV: str(nproc), "LOGLEVEL": "INFO"}),
                           timeout=clock.left() - reserve_s, clock=clock, tag=f"e. golden x{nproc}")
        if code != 0:
            return {**out, "identical": False, "error": f"{nproc} processes: exit {code}: {log[-1500:]}"}
        workers = [l for l in log.splitlines() if "role_world_sizes=" in l]
        out["torchrun_world"] = workers[0].split("role_world_sizes=")[1].split("]")[0] + "]" if workers else None
        out["identical"] = outputs(many) == outputs(plain)
        out["files_compared"] = len(outputs(plain))
        clock.say(f"e. dist: {nproc} x {backend} {'==' if out['identical'] else '!='} one process "
                  f"({out['files_compared']} files)")
        if dev.type == "cuda":
            probe = tmp / "probe.py"
            probe.write_text(PROBE)
            code, log = stream([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                str(nproc), str(probe)], cwd=tmp, env=env(PROBE_BACKEND="nccl"),
                               timeout=clock.left() - reserve_s, clock=clock, tag="e. nccl probe")
            seen = sorted(l for l in log.splitlines() if l.startswith("probe "))
            want = sum(range(1, nproc + 1))
            out["nccl_probe"] = code == 0 and len(seen) == nproc and all(l.endswith(f"all_reduce {want}") for l in seen)
        out["seconds"] = round(time.perf_counter() - t0, 1)
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------ main
@click.command()
@click.option("--device", default="auto", show_default=True,
              help="auto (cuda when there is one), cuda, cuda:N or cpu (the small mode).")
@click.option("--budget-s", type=float, default=420, show_default=True,
              help="Seconds for everything: a part that would overrun is skipped, with a note.")
@click.option("--skip", default="", help=f"Comma-separated parts to leave out: {', '.join(PARTS[1:])}.")
@click.option("--precision", type=click.Choice(PRECISIONS), default=None,
              help="Autocast of bench and search [default: fp16 on CUDA, as CoOp ran CLIP; auto (fp32) on the CPU].")
@click.option("--profile", default="profiles/paper.yaml", show_default=True,
              help="Where the paper's settings come from (prune, golden, predictor).")
def main(device: str, budget_s: float, skip: str, precision: str | None, profile: str) -> None:
    """Benchmark the paper's setting on this machine's GPU; ends with one JSON line of every figure."""
    dev = check_device("cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device)
    skips = {s.strip() for s in skip.split(",") if s.strip()}
    unknown = sorted(skips - set(PARTS[1:]))
    if unknown:
        raise ClipPruneError(f"--skip {','.join(unknown)}: not a part; choose from {', '.join(PARTS[1:])}")
    if budget_s <= 0:
        raise ClipPruneError(f"--budget-s must be > 0 seconds, got {budget_s}")
    prune, golden_params, predictor_params = config.load("prune", "golden", "predictor", path=ROOT / profile)
    small = dev.type != "cuda"
    if small:  # tiny matmuls gain nothing from a second thread, and on a busy shared CPU lose ~10x to it (conftest)
        torch.set_num_threads(1)
    size = sizes(small)
    size["precision"] = precision or size["precision"]
    clock = Clock(budget_s)
    result: dict = {"gpu_check": 1, "mode": "small" if small else "cuda", "budget_s": budget_s}
    clock.say(f"mode {result['mode']} on {dev}; budget {budget_s:.0f} s")

    # Each part keeps back the time the cheaper parts after it need, so one slow part cannot starve them all.
    reserve = {"bench": 60, "golden": 45, "smoke": 60, "dist": 5} if not small else {"bench": 0, "golden": 0, "smoke": 0, "dist": 0}
    need = {"bench": 20, "golden": 15, "smoke": 120, "dist": 25} if not small else {"bench": 5, "golden": 5, "smoke": 0, "dist": 20}

    def part(name: str, fn) -> None:
        lacking = [m for m in NEEDS[name] if importlib.util.find_spec(m) is None]
        if name in skips:
            result[name] = {"skipped": "--skip"}
        elif lacking:
            result[name] = {"skipped": f"missing packages: {', '.join(lacking)} (make gpu-check installs them in .venv)"}
        elif clock.left() - reserve[name] < need[name]:
            result[name] = {"skipped": f"budget: {clock.left():.0f} s of --budget-s {budget_s:.0f} left, it needs ~{need[name]} s"}
        else:
            clock.say(f"{name} ...")
            try:
                result[name] = fn()
            except Exception as e:  # one part failing must not hide the others' figures
                traceback.print_exc()
                result[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        if "skipped" in result[name]:
            clock.say(f"{name}: skipped ({result[name]['skipped']})")

    result["machine"] = machine(dev)
    clock.say("a. " + ", ".join(f"{k} {v}" for k, v in result["machine"].items()))
    layer = prune.layer * V.depth(build_model_once(size["arch"], dev).visual) // BASE_DEPTH
    d = size["predictor_d"] or predictor_params.d
    part("bench", lambda: bench(build_model_once(size["arch"], dev), dev=dev, size=size, keep=prune.keep, layer=layer,
                                d=d, clock=clock, reserve_s=reserve["bench"]))
    part("golden", lambda: golden(build_model_once(size["arch"], dev), dev=dev, size=size, golden_params=golden_params,
                                  layer=layer, clock=clock, reserve_s=reserve["golden"]))
    if small and "smoke" not in skips:
        result["smoke"] = {"skipped": "no CUDA: the paper smoke run is `make smoke-paper` on a CPU (~5 min)"}
        clock.say(f"smoke: skipped ({result['smoke']['skipped']})")
    else:
        part("smoke", lambda: smoke(clock=clock, reserve_s=reserve["smoke"]))
    part("dist", lambda: dist_check(dev=dev, size=size, clock=clock, reserve_s=reserve["dist"]))
    result["skipped"] = {k: result[k]["skipped"] for k in PARTS[1:] if "skipped" in result[k]}
    result["errors"] = {k: result[k]["error"] for k in PARTS[1:] if "error" in result[k]}
    result["elapsed_s"] = round(clock.elapsed(), 1)
    clock.say("done")
    print(json.dumps(finite(result), allow_nan=False, default=str), flush=True)


def finite(x):
    """JSON has no NaN or infinity: such a figure is reported as null (and the test fails on it)."""
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x


_MODELS: dict = {}


def build_model_once(arch: str, dev: torch.device):
    """One random-init CLIP of `arch` on `dev`, shared by the parts (building ViT-B-16 costs seconds)."""
    if arch not in _MODELS:
        from clipprune.model import build_model

        import logging

        torch.manual_seed(0)
        root = logging.getLogger()
        level, root.level = root.level, logging.ERROR  # random init is intended: hush open_clip's warning
        try:
            _MODELS[arch] = build_model(arch, device=str(dev))[0]
        finally:
            root.level = level
    return _MODELS[arch]


if __name__ == "__main__":
    run(main)
