"""The data stage's prerequisite check: every missing thing is one line, all reported at once, before any fetch."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from clipprune import prereq
from clipprune.coop import SOURCES
from clipprune.config import DataParams
from clipprune.errors import ClipPruneError
from test_coop import FakeNet, make_coop

ROOT = Path(__file__).resolve().parent.parent
GB = 1e9


def tree(folder: Path) -> set:
    return {p.relative_to(folder) for p in folder.rglob("*")}


def params(tmp_path, **data) -> DataParams:
    base = dict(datasets=["coop/DTD"], root=str(tmp_path / "data" / "coop"), source=None, download=True,
                cache=str(tmp_path / "cache"), n_train=0, n_test=10)
    return DataParams(**{**base, **data})


def _no_gdown(monkeypatch):
    monkeypatch.setitem(sys.modules, "gdown", None)  # importlib.util.find_spec then reports it absent


def _low_disk(monkeypatch):
    real = prereq.shutil.disk_usage
    monkeypatch.setattr(prereq.shutil, "disk_usage", lambda p: real(p)._replace(free=int(1 * GB)))


# (what is missing, data params, environment change, what its line must say)
CASES = {
    "gdown": (dict(datasets=["coop/DTD", "coop/FGVCAircraft"]), _no_gdown,
              ["package gdown missing: coop/DTD fetch", "pip install -e '.[paper]'"]),
    "imagenet": (dict(datasets=["coop/ImageNet"]), None,
                 ["coop/ImageNet: not found", "cannot be downloaded", "imagenet/images/train/<wnid>/"]),
    "no download": (dict(download=False), None, ["coop/DTD: not found", "data.download is false", "dtd-r1.0.1"]),
    "no source": (dict(source="/no/such/root"), None, ["data.source: /no/such/root does not exist"]),
    "cache in root": (dict(cache="{root}/cache"), None, ["data.cache:", "inside data.root", "DVC deletes"]),
    "disk": (dict(datasets=["coop/Food101"]), _low_disk, ["disk:", "1.0 GB free", "coop/Food101 need ~"]),
    "unknown": (dict(datasets=["coop/SUN398"]), None, ["data.datasets: coop/SUN398: unknown CoOp dataset"]),
    "clip_benchmark offline": (dict(datasets=["cifar10"], download=False), None, ["cifar10:", "data.download"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_missing_thing_is_one_line(tmp_path, monkeypatch, case):
    data_kw, env, expect = CASES[case]
    data_kw = {k: v.format(root=tmp_path / "data" / "coop") if isinstance(v, str) else v for k, v in data_kw.items()}
    if env is not _no_gdown:  # gdown present, whatever this machine has: only `case` is missing
        real = prereq.importlib.util.find_spec
        monkeypatch.setattr(prereq.importlib.util, "find_spec", lambda n, *a: object() if n == "gdown" else real(n, *a))
    if env:
        env(monkeypatch)
    before = tree(tmp_path)
    _, problems = prereq.check(params(tmp_path, **data_kw))
    assert len(problems) == 1, problems
    for part in expect:
        assert part in problems[0], (part, problems[0])
    assert "\n" not in problems[0]
    assert tree(tmp_path) == before  # the check writes nothing


def test_all_missing_things_at_once_before_any_fetch(tmp_path, monkeypatch):
    make_coop(tmp_path / "src", "OxfordPets")  # present: no line for it
    net = FakeNet({}, tmp_path / "calls.log")
    net.install(monkeypatch)
    _no_gdown(monkeypatch)
    _low_disk(monkeypatch)
    data = params(tmp_path, source=str(tmp_path / "src"),
                  datasets=["coop/OxfordPets", "coop/DTD", "coop/Food101", "coop/ImageNet", "coop/SUN398"])
    before = tree(tmp_path)
    with pytest.raises(ClipPruneError) as e:
        prereq.require(data)
    lines = str(e.value).splitlines()
    assert lines[0].startswith("4 data prerequisite(s) missing; nothing was downloaded or copied")
    body = "\n".join(lines[1:])
    assert len(lines) == 5 and "coop/ImageNet" in body and "coop/SUN398" in body and "gdown" in body
    # cache and data.root share this disk: the downloads (archive + extracted, published sizes) and every staged
    # copy twice (data.root and DVC's cache of it), the copied OxfordPets at its size on disk
    pets = sum(f.stat().st_size for f in (tmp_path / "src").rglob("*") if f.is_file()) / 1e9
    gb = 2 * pets + sum(SOURCES[n].archive_gb + 3 * SOURCES[n].extracted_gb for n in ("DTD", "Food101"))
    assert f"coop/OxfordPets, coop/DTD, coop/Food101 need ~{gb:.1f} GB" in body
    assert net.calls == [] and tree(tmp_path) == before


def test_met_prerequisites_say_where_each_comes_from(tmp_path, monkeypatch):
    make_coop(tmp_path / "src", "OxfordPets")
    make_coop(tmp_path / "cache", "DTD")  # a finished earlier download
    data = params(tmp_path, source=str(tmp_path / "src"), download=False, datasets=["coop/OxfordPets", "coop/DTD"])
    plans = prereq.require(data)
    assert [(p.dataset, p.origin, p.path) for p in plans] == [
        ("coop/OxfordPets", "source", tmp_path / "src" / "oxford_pets"),
        ("coop/DTD", "cache", tmp_path / "cache" / "dtd")]
    # an unfinished download in the cache does not count as present
    (tmp_path / "cache" / "dtd" / "split_zhou_DescribableTextures.json").unlink()
    _, problems = prereq.check(data)
    assert len(problems) == 1 and problems[0].startswith("coop/DTD: not found")


@pytest.mark.slow  # three interpreter starts (~25 s on 2 shared cores)
def test_check_only_through_the_shell(tmp_path):
    """`python -m stages.data --check-only` (what make paper runs before dvc repro): exit 2 and one line per
    missing thing, nothing written; with everything present, exit 0 and nothing written either."""
    p = yaml.safe_load((ROOT / "profiles" / "paper.yaml").read_text())
    p["data"].update(datasets=["coop/OxfordPets", "coop/ImageNet"], source=str(tmp_path / "nowhere"),
                     download=False, cache=str(tmp_path / "cache"))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for args in (["--check-only"], []):  # the full stage runs the same check first
        out = subprocess.run([sys.executable, "-m", "stages.data", *args], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 2, out.stderr
        err = out.stderr.strip().splitlines()
        assert err[0].startswith("error: 3 data prerequisite(s) missing") and len(err) == 4, out.stderr
        assert "Traceback" not in out.stderr
        assert tree(tmp_path) == {Path("params.yaml")}
    make_coop(tmp_path / "cache", "OxfordPets")
    make_coop(tmp_path / "cache", "ImageNet")
    p["data"]["source"] = None
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    before = tree(tmp_path)
    out = subprocess.run([sys.executable, "-m", "stages.data", "--check-only"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"coop/ImageNet: copied from {tmp_path / 'cache' / 'imagenet'}" in out.stdout
    assert tree(tmp_path) == before


def test_paper_profile_says_where_imagenet_goes(tmp_path):
    from clipprune import config

    (data,) = config.load("data", path=ROOT / "profiles" / "paper.yaml")
    assert "coop/ImageNet" in data.datasets
    data.cache = str(tmp_path / "cache")
    _, problems = prereq.check(data)
    (line,) = [p for p in problems if p.startswith("coop/ImageNet")]
    assert "cannot be downloaded" in line and "imagenet/images/train/<wnid>/" in line and "classnames.txt" in line
    assert str(tmp_path / "cache") in line
