"""The pipeline's shared pieces: params validation, the accuracy gate, reports, ranking groups."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from clipprune import config, report
from clipprune import methods as M
from clipprune import vit as V
from clipprune.errors import ClipPruneError
from clipprune.data import dataset_labels, load_dataset
from clipprune.data import stratified_indices
from clipprune.experiment import digest
from clipprune.pipeline import ranking_groups
from conftest import run_every_stage, tiny_clip

ROOT = Path(__file__).resolve().parent.parent


PROFILES = ["params.yaml", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "profiles").glob("*.yaml"))]


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_validates(profile):
    """Every shipped profile, not only the default, through the loader the stages use: every section, so a
    misspelt key or a quoted number in profiles/paper.yaml fails here, not hours into a GPU run."""
    params = config.load_params(ROOT / profile)
    assert set(params) == set(config.SECTIONS), f"{profile} must define every section"
    for name in config.SECTIONS:
        config.section(params, name)


@pytest.mark.parametrize("edit,msg", [
    ({"prune": {"keep": "most"}}, "'prune.keep' must be float"),
    ({"prune": {"kep": 0.5}}, "unknown key 'prune.kep'"),
    ({"golden": {"per_round": 1.5}}, "'golden.per_round' must be int"),
    ({"data": {"datasets": "synth/shape"}}, "'data.datasets' must be list"),
    ({"nonsense": {}}, "unknown section"),
])
def test_bad_params_are_one_clear_error(tmp_path, edit, msg):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in edit.items():
        params.setdefault(section, {}).update(values)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(ClipPruneError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        params = config.load_params(path)
        for name in config.SECTIONS:
            config.section(params, name)


def test_stage_with_bad_params_exits_with_one_line(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["prune"]["keep"] = "most"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = subprocess.run([sys.executable, "-m", "stages.check", "--params", str(tmp_path / "params.yaml")],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == ["error: params: 'prune.keep' must be float, got 'most'"]


def metrics_with(full: float, method: float) -> dict:
    results = {d: {m: {"metrics": {"acc1": a}, "gflops": g} for m, a, g in (("full", full, 1.0), ("predictor", method, 0.7))}
               for d in ("synth/a", "synth/b")}
    return report.build_metrics(results)


def test_summary_names_what_its_figures_describe():
    """No profile's accuracies may read as the paper's: the summary's first line says which model and data."""
    synth = {"data": {"datasets": ["synth/shape", "synth/size"]}, "model": {"arch": "clipprune-tiny", "pretrained": None}}
    cifar = {"data": {"datasets": ["wds/cifar10"]}, "model": {"arch": "clipprune-tiny", "pretrained": None}}
    paper = {"data": {"datasets": ["coop/OxfordPets"]}, "model": {"arch": "ViT-B-16-quickgelu", "pretrained": "openai"}}
    assert report.provenance(synth).startswith("Default profile: a small CLIP trained here on a generated world")
    assert "wds/cifar10's train split" in report.provenance(cifar) and "not** the paper's" in report.provenance(cifar)
    assert "`ViT-B-16-quickgelu` with weights `openai`" in report.provenance(paper)


def test_gate_fails_when_max_drop_is_below_the_measured_drop():
    metrics = metrics_with(0.90, 0.86)  # measured drop 0.04
    assert report.gate(metrics, None, method="predictor", max_drop=0.05, tolerance=0.01) == []
    failures = report.gate(metrics, None, method="predictor", max_drop=0.03, tolerance=0.01)
    assert len(failures) == 1 and "loses 0.0400" in failures[0]


def test_gate_fails_on_regression_against_committed_metrics():
    committed, now = metrics_with(0.90, 0.88), metrics_with(0.90, 0.86)
    assert report.gate(now, committed, method="predictor", max_drop=0.5, tolerance=0.03) == []
    failures = report.gate(now, committed, method="predictor", max_drop=0.5, tolerance=0.01)
    assert len(failures) == 2 and all("fell 0.8800 -> 0.8600" in f for f in failures)


def test_gate_needs_both_rows():
    assert "no mean acc1" in report.gate(metrics_with(0.9, 0.8), None, method="tome", max_drop=1, tolerance=1)[0]


@pytest.mark.slow  # 15-20 s: make test-all and CI run it
def test_check_stage_exit_codes(tmp_path):
    """The gate as CI runs it: exit 1 with the reason when max_drop is below the drop, 0 otherwise."""
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "metrics.json").write_text(json.dumps(metrics_with(0.90, 0.86)))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["prune"]["method"] = "predictor"
    for max_drop, code in ((0.03, 1), (0.05, 0)):
        params["check"]["max_drop"] = max_drop
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        out = subprocess.run([sys.executable, "-m", "stages.check", "--no-against-git"], capture_output=True, text=True,
                             cwd=tmp_path, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
        assert out.returncode == code, out.stderr
        assert ("check failed" in out.stderr) == (code == 1)
        # As the pipeline runs it (dvc.yaml: --record): the experiment completes, the verdict is a DVC metric.
        out = subprocess.run([sys.executable, "-m", "stages.check", "--no-against-git", "--record"], capture_output=True,
                             text=True, cwd=tmp_path, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
        verdict = json.loads((tmp_path / "reports" / "check.json").read_text())
        assert out.returncode == 0 and verdict["passed"] == (code == 0), out.stderr
        assert verdict["mean_drop"] == pytest.approx(0.04) and len(verdict["failures"]) == code


def test_kept_patches_recovers_each_selection():
    model = tiny_clip()
    x = torch.randn(3, 3, 32, 32)
    n = V.num_patches(model.visual)
    order = torch.stack([torch.randperm(n, generator=torch.Generator().manual_seed(i)) for i in range(3)])
    method = M.build_method("ranking")
    M.prune(model, method, keep=0.5, layer=2)
    method.bind(order)
    mask = report.kept_patches(model, x, layer=2, forward=model.encode_image)
    V.unpatch(model)
    for b in range(3):
        assert sorted(mask[b].nonzero()[:, 0].tolist()) == sorted(order[b, n // 2:].tolist())


def test_synth_tasks_share_one_ranking_when_label_free_or_joint():
    data = config.DataParams(datasets=["synth/shape", "synth/colour", "wds/cifar10"])
    assert ranking_groups(data, config.GoldenParams(score="similarity")) == {"synth": "synth/shape", "wds-cifar10": "wds/cifar10"}
    for score in ("label", "max", "fidelity"):  # these read each task's classifier: one ranking per task
        assert ranking_groups(data, config.GoldenParams(score=score)) == {
            "synth-shape": "synth/shape", "synth-colour": "synth/colour", "wds-cifar10": "wds/cifar10"}
        # golden.joint sums the score over the synthetic tasks: one ranking for them again
        assert ranking_groups(data, config.GoldenParams(score=score, joint=True)) == {
            "synth": "synth/shape", "wds-cifar10": "wds/cifar10"}


@pytest.mark.slow  # about a minute: make test-all and CI run it
def test_default_profile_runs_every_stage_with_one_joint_ranking(tmp_path):
    """params.yaml on a tiny world: the five tasks share one golden ranking, scored over all of them, and one
    predictor; every stage runs and every task is evaluated by every method, and (predictor.transfer_from) with
    another task's predictor and tokens; the sweep reads the same stratified images for every point."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert params["golden"]["joint"] and params["golden"]["score"] == "fidelity"
    params["data"].update(datasets=["synth/shape", "synth/size"], n_train=64, n_test=6)  # two tasks: joint, and fast
    params["golden"]["train_sample"] = "stratified"  # the paper profile's choice (the default's "first" runs in CI)
    params["predictor"]["transfer_from"] = "synth/shape"
    run_every_stage(params, tmp_path, n_ranked=4)
    assert sorted(p.name for p in (tmp_path / "rankings").glob("*.pt")) == ["synth-test.pt", "synth-train.pt"]
    test_ranking = torch.load(tmp_path / "rankings" / "synth-test.pt")
    # golden.train_sample: stratified ranks 4 train images drawn per class with data.seed, and says which; the
    # predictor stage trained on exactly those (it checks the ranking's fingerprint against the images it pairs).
    train_ranking = torch.load(tmp_path / "rankings" / "synth-train.pt")
    shape = dataset_labels(load_dataset("synth/shape", root=tmp_path / params["data"]["root"], split="train").dataset)
    assert train_ranking["meta"]["indices"] == stratified_indices(shape, 4, seed=params["data"]["seed"]) != [0, 1, 2, 3]
    assert test_ranking["meta"]["tasks"] == params["data"]["datasets"] and len(test_ranking["patch_order"]) == 6
    assert [p.name for p in (tmp_path / "models" / "predictors").iterdir()] == ["synth.pt"]
    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    assert set(metrics["datasets"]) == set(params["data"]["datasets"])
    transferred = ["predictor@shape", "predictor+tokens@shape"]
    assert all(set(m) == set(params["eval"]["methods"] + transferred) for m in metrics["datasets"].values())

    # predictor.transfer_from: each dataset evaluated with shape's predictor and tokens, on its own test split.
    # The tasks share one predictor here (joint), so predictor@shape is each task's own predictor row, number for
    # number, and on shape itself predictor+tokens@shape is its own predictor+tokens row.
    def record(dataset, row):
        return json.loads((tmp_path / "reports" / "eval" / dataset.replace("/", "-") / f"{row}.json").read_text())

    for d in params["data"]["datasets"]:
        r = record(d, "predictor+tokens@shape")
        assert r["dataset"] == d and r["setting"]["trained_on"] == "synth/shape"
        assert record(d, "predictor@shape")["metrics"] == record(d, "predictor")["metrics"]
    assert record("synth/shape", "predictor+tokens@shape")["metrics"] == record("synth/shape", "predictor+tokens")["metrics"]

    # The sweep: one class-stratified sample per task (data.seed), the same for every method and keep.
    sweep = json.loads((tmp_path / "reports" / "sweep.json").read_text())
    for d in params["data"]["datasets"]:
        labels = dataset_labels(load_dataset(d, root=tmp_path / params["data"]["root"], split="test").dataset)
        want = digest(stratified_indices(labels[:params["data"]["n_test"]], params["eval"]["sweep_images"],
                                         seed=params["data"]["seed"]))
        assert {r["images"] for r in sweep["rows"] if r["dataset"] == d} == {want}
    # summary.md shows exactly the params its stage declares: an undeclared section could change without the
    # report rerunning, and the file would then show a stale value.
    shown = json.loads((tmp_path / "reports" / "summary.md").read_text().split("```yaml")[1].split("```")[0])
    report_stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["report"]
    assert shown == config.pick(params, report_stage["params"]) and "check" not in shown


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_defines_the_params_dvc_yaml_declares(profile):
    """dvc repro refuses a stage whose declared param is missing from params.yaml ("Parameters ... are missing"),
    which running the stages one by one never sees: every profile must define every key dvc.yaml declares."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    params = yaml.safe_load((ROOT / profile).read_text())
    declared = sorted({key for stage in stages.values() for key in stage.get("params", []) if isinstance(key, str)})
    missing = []
    for key in declared:
        node = params
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                missing.append(key)
                break
            node = node[part]
    assert declared and not missing, f"{profile} lacks {missing}"


COOP_SPLITS = ROOT.parent / "shared" / "data" / "coop_splits"


def test_stratified_indices_cover_every_class_in_proportion():
    """The sweep's sample: each class's share of n in proportion to its size (largest remainders, ties to the
    lower class), whatever the order of the list; seeded; every image when n covers the split."""
    def counts(labels, idx):
        return {c: sum(labels[i] == c for i in idx) for c in sorted(set(labels))}

    sorted_labels = [0] * 50 + [1] * 30 + [2] * 20  # sorted by class, as CoOp's test lists are
    idx = stratified_indices(sorted_labels, 10, seed=0)
    assert counts(sorted_labels, idx) == {0: 5, 1: 3, 2: 2} and idx == sorted(set(idx))
    assert idx == stratified_indices(sorted_labels, 10, seed=0) != stratified_indices(sorted_labels, 10, seed=1)
    uneven = [0] * 7 + [1] * 7 + [2] * 6  # quotas 3.5, 3.5, 3.0: the spare one goes to class 0
    assert counts(uneven, stratified_indices(uneven, 10, seed=0)) == {0: 4, 1: 3, 2: 3}
    shuffled = [sorted_labels[i] for i in torch.randperm(100, generator=torch.Generator().manual_seed(0)).tolist()]
    assert counts(shuffled, stratified_indices(shuffled, 10, seed=0)) == {0: 5, 1: 3, 2: 2}
    assert stratified_indices(uneven, 20, seed=0) == stratified_indices(uneven, 99, seed=3) == list(range(20))


@pytest.mark.skipif(not COOP_SPLITS.is_dir(), reason="CoOp split files not present (../shared/data/coop_splits)")
def test_sweep_sample_of_a_real_coop_test_list_covers_every_class():
    labels = [y for _, y, _ in json.loads((COOP_SPLITS / "split_zhou_Caltech101.json").read_text())["test"]]
    n, total = 1000, len(labels)
    assert len(set(labels[:n])) == 22  # what "the first sweep_images" covered
    idx = stratified_indices(labels, n, seed=1)
    assert len(idx) == n
    for c in set(labels):
        size = labels.count(c)
        assert sum(labels[i] == c for i in idx) in {n * size // total, -(-n * size // total)}, c
