"""Aggregate results: metrics.json (what `dvc metrics` and the gate read), plot data, figures, summary.md."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from .errors import ClipPruneError
from .pipeline import safe_name


def collect(eval_dir: Path, datasets: list[str], methods: list[str]) -> dict:
    """reports/eval/<dataset>/<method>.json -> {dataset: {method: record}}; one clear error if one is missing."""
    out = {}
    for d in datasets:
        out[d] = {}
        for m in methods:
            path = eval_dir / safe_name(d) / f"{safe_name(m)}.json"
            if not path.is_file():
                raise ClipPruneError(f"missing evaluation {path}: run the evaluate stage (dvc repro evaluate)")
            out[d][m] = json.loads(path.read_text())
    return out


UNPRUNED = ("full", "full+tokens")


def intervals(results: dict, *, resamples: int, seed: int) -> dict:
    """Every row's paired-bootstrap difference in acc1 against full, random and the best other pruned row (the
    highest mean among the rows that are neither it nor unpruned), per dataset and for the mean."""
    from .stats import bits, paired_bootstrap

    datasets = list(results)
    methods = list(results[datasets[0]])
    per_image = {}
    for m in methods:
        for d in datasets:
            if "per_image_top1" not in results[d][m]:
                raise ClipPruneError(f"reports/eval/{safe_name(d)}/{safe_name(m)}.json has no per-image results (written "
                                     "before they were recorded): rerun the evaluate stage (dvc repro -f evaluate)")
        per_image[m] = {d: bits(results[d][m]["per_image_top1"]) for d in datasets}
    mean = {m: sum(results[d][m]["metrics"]["acc1"] for d in datasets) / len(datasets) for m in methods}
    out = {}
    for m in methods:
        others = [o for o in methods if o != m and o not in UNPRUNED]
        versus = {"full": "full", "random": "random",
                  "best_other": max(others, key=lambda o: mean[o]) if others else None}
        out[m] = {}
        for name, ref in versus.items():
            if ref is None or ref == m or ref not in per_image:
                continue
            out[m][f"vs_{name}"] = {"against": ref, **paired_bootstrap(per_image[m], per_image[ref],
                                                                        resamples=resamples, seed=seed)}
    return out


def build_metrics(results: dict, *, predictor: Optional[dict] = None, resamples: Optional[int] = None,
                  seed: int = 0) -> dict:
    """Per dataset and method acc1 and GFLOPs, their mean over datasets, drops against full, predictor fidelity;
    with `resamples`, every row's paired-bootstrap 95% intervals (see `intervals`)."""
    datasets = list(results)
    methods = list(results[datasets[0]])
    per = {d: {m: {"acc1": round(r["metrics"]["acc1"], 6), "gflops": round(r["gflops"], 6)} for m, r in rows.items()}
           for d, rows in results.items()}
    mean = {m: {"acc1": round(sum(per[d][m]["acc1"] for d in datasets) / len(datasets), 6),
                "gflops": round(sum(per[d][m]["gflops"] for d in datasets) / len(datasets), 6)} for m in methods}
    metrics = {"datasets": per, "mean": mean}
    if "full" in mean:
        metrics["drop_vs_full"] = {m: round(mean["full"]["acc1"] - v["acc1"], 6) for m, v in mean.items() if m != "full"}
    if predictor:
        metrics["predictor"] = predictor
    if resamples:
        metrics["intervals"] = intervals(results, resamples=resamples, seed=seed)
    return metrics


def judged_drop(metrics: dict, *, method: str, estimate: str = "point") -> float:
    """The mean acc1 `method` loses against full: observed (point), or the upper end of its 95% interval (upper)."""
    mean = metrics["mean"]
    if estimate == "point":
        return mean["full"]["acc1"] - mean[method]["acc1"]
    interval = metrics.get("intervals", {}).get(method, {}).get("vs_full", {}).get("mean")
    if interval is None:
        raise ClipPruneError("check.drop_estimate is 'upper' but reports/metrics.json has no interval for "
                             f"{method} vs full; rerun the report stage (dvc repro report)")
    return -interval["lo"]  # the difference is method - full: its lower end is the largest drop


def gate(metrics: dict, committed: Optional[dict], *, method: str, max_drop: float, tolerance: float,
         estimate: str = "point") -> list[str]:
    """Failures of the accuracy gate (empty = pass): the method's mean drop vs full (observed, or the upper end of
    its interval), and regressions vs git."""
    failures = []
    mean = metrics.get("mean", {})
    if method not in mean or "full" not in mean:
        return [f"metrics have no mean acc1 for {method!r} and 'full'; evaluate both (eval.methods)"]
    drop = judged_drop(metrics, method=method, estimate=estimate)
    if drop > max_drop:
        what = "mean acc1" if estimate == "point" else "mean acc1 at the upper end of its 95% interval"
        failures.append(f"{method} loses {drop:.4f} {what} against full, more than check.max_drop={max_drop}")
    if committed is not None:
        # Every committed row must still be measured: a dataset or method that vanished is a failure, never a skip.
        if not committed.get("datasets"):
            failures.append("the committed metrics have no per-dataset acc1 to compare with; recommit reports/metrics.json")
        for d, rows in committed.get("datasets", {}).items():
            for m, old in rows.items():
                new = metrics.get("datasets", {}).get(d, {}).get(m)
                if new is None:
                    failures.append(f"{d}/{m} is in the committed metrics but not in the new ones; evaluate it, or "
                                    "commit the new reports/metrics.json if dropping it is intended")
                elif old["acc1"] - new["acc1"] > tolerance:
                    failures.append(f"{d}/{m} acc1 fell {old['acc1']:.4f} -> {new['acc1']:.4f}, beyond check.tolerance={tolerance}")
    return failures


def plot_rows(sweep: dict) -> list[dict]:
    """Mean acc1 and GFLOPs over datasets for each (method, keep) point of the sweep."""
    by_point: dict[tuple, list] = {}
    for r in sweep["rows"]:
        by_point.setdefault((r["method"], r["keep"]), []).append(r)
    return [{"method": m, "keep": k, "acc1": round(sum(r["acc1"] for r in rs) / len(rs), 6),
             "gflops": round(sum(r["gflops"] for r in rs) / len(rs), 6)} for (m, k), rs in sorted(by_point.items())]


def write_plot_data(out_dir: Path, metrics: dict, vs_keep: list[dict]) -> None:
    """DVC plot data: acc_vs_keep.csv (a column per method) and acc_vs_gflops/<method>.csv (a file per method:
    DVC plots colour by file or column, not by a row's value)."""
    import pandas as pd

    from .io import write_bytes_atomic

    df = pd.DataFrame(vs_keep)
    wide = df.pivot(index="keep", columns="method", values="acc1").reset_index()
    write_bytes_atomic(out_dir / "acc_vs_keep.csv", wide.to_csv(index=False).encode())
    for method, rows in df.groupby("method"):
        write_bytes_atomic(out_dir / "acc_vs_gflops" / f"{safe_name(method)}.csv",
                           rows[["gflops", "acc1"]].to_csv(index=False).encode())
    for m, v in metrics["mean"].items():  # the unswept rows are single points
        if m not in set(df["method"]):
            write_bytes_atomic(out_dir / "acc_vs_gflops" / f"{safe_name(m)}.csv",
                               pd.DataFrame([{"gflops": v["gflops"], "acc1": v["acc1"]}]).to_csv(index=False).encode())


def figures(metrics: dict, vs_keep: list[dict], out_dir: Path) -> list[Path]:
    """seaborn PNGs: accuracy vs keep, accuracy vs GFLOPs, per-dataset bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    sns.set_theme(style="whitegrid")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    df = pd.DataFrame(vs_keep)
    for x, name, xlabel in (("keep", "acc_vs_keep.png", "patch tokens kept (each point at the predictor's GFLOPs)"),
                            ("gflops", "acc_vs_gflops.png", "GFLOPs (MACs, image tower, batch 1)")):
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        sns.lineplot(df, x=x, y="acc1", hue="method", marker="o", ax=ax)
        for m in ("full", "predictor+tokens", "full+tokens", *(m for m in metrics["mean"] if "@" in m)):
            if m in metrics["mean"] and x == "gflops":  # unswept rows (transferred ones: predictor@<source>) as stars
                ax.scatter(metrics["mean"][m]["gflops"], metrics["mean"][m]["acc1"], marker="*", s=140, label=m, zorder=5)
        ax.set(xlabel=xlabel, ylabel="mean zero-shot top-1")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=120)
        plt.close(fig)
        paths.append(out_dir / name)
    bars = pd.DataFrame([{"dataset": d, "method": m, "acc1": v["acc1"]} for d, rows in metrics["datasets"].items()
                         for m, v in rows.items()])
    fig, ax = plt.subplots(figsize=(9, 4.2))
    sns.barplot(bars, x="dataset", y="acc1", hue="method", ax=ax)
    ax.set(ylabel="zero-shot top-1", xlabel="")
    ax.legend(fontsize=7, ncol=4, loc="lower center")
    fig.tight_layout()
    fig.savefig(out_dir / "per_dataset.png", dpi=120)
    plt.close(fig)
    paths.append(out_dir / "per_dataset.png")
    if "intervals" in metrics:
        paths.append(difference_figure(metrics["intervals"], out_dir / "diff_vs_full.png"))
    return paths


def difference_figure(intervals: dict, path: Path) -> Path:
    """Each row's top-1 difference against full, per dataset and on the mean, with its 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(m, d, v) for m, vs in intervals.items() if "vs_full" in vs
            for d, v in vs["vs_full"].items() if d != "against"]
    methods = list(dict.fromkeys(m for m, _, _ in rows))
    places = list(dict.fromkeys(d for _, d, _ in rows))
    fig, ax = plt.subplots(figsize=(9, 4.2))
    width = 0.8 / max(1, len(methods))
    for i, m in enumerate(methods):
        pts = [(places.index(d) + (i - (len(methods) - 1) / 2) * width, v) for mm, d, v in rows if mm == m]
        x = [p for p, _ in pts]
        y = [100 * v["diff"] for _, v in pts]
        err = [[100 * (v["diff"] - v["lo"]) for _, v in pts], [100 * (v["hi"] - v["diff"]) for _, v in pts]]
        ax.errorbar(x, y, yerr=err, fmt="o", capsize=2, label=m, markersize=4)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(places)), [d.split("/")[-1] for d in places])
    ax.set(ylabel="top-1 vs full (points, 95% interval)", xlabel="")
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def kept_patches(model, images: torch.Tensor, *, layer: int, forward) -> torch.Tensor:
    """[B, N] bool: which patches survive into block `layer`, recovered from the tokens themselves.

    Works for any selection method: the rows entering block L are matched against the rows leaving
    block L-1 (or the embeddings, at L = 0), so nothing here re-implements a selector.
    """
    vit = model.visual
    seen = {}
    blocks = vit.transformer.resblocks
    before = blocks[layer - 1].register_forward_hook(lambda m, i, o: seen.__setitem__("before", o)) if layer else \
        vit.ln_pre.register_forward_hook(lambda m, i, o: seen.__setitem__("before", o))
    after = blocks[layer].register_forward_pre_hook(lambda m, i: seen.__setitem__("after", i[0]))
    try:
        with torch.no_grad():
            forward(images)
    finally:
        before.remove()
        after.remove()
    patches, kept = seen["before"][:, 1:], seen["after"][:, 1:]
    match = (patches[:, :, None, :] == kept[:, None, :, :]).all(-1)  # [B, N, K]
    return match.any(-1)


def overlay_figure(images: torch.Tensor, masks: dict[str, torch.Tensor], grid: tuple[int, int], path: Path) -> Path:
    """Rows = images, columns = methods; pruned patches are dimmed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, names = images.shape[0], list(masks)
    fig, axes = plt.subplots(n, len(names) + 1, figsize=(1.6 * (len(names) + 1), 1.6 * n), squeeze=False)
    h, w = images.shape[2:]
    for i in range(n):
        img = images[i].permute(1, 2, 0).clamp(0, 1).numpy()
        axes[i, 0].imshow(img)
        for j, name in enumerate(names):
            m = masks[name][i].view(*grid).float()
            m = torch.nn.functional.interpolate(m[None, None], size=(h, w), mode="nearest")[0, 0].numpy()
            axes[i, j + 1].imshow(img * (0.25 + 0.75 * m[..., None]))
            if i == 0:
                axes[i, j + 1].set_title(name, fontsize=8)
        if i == 0:
            axes[i, 0].set_title("image", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def provenance(params: dict) -> str:
    """One line on what model and data the figures describe, so no profile's numbers pass for the paper's."""
    data, model = params["data"], params["model"]
    if model.get("pretrained"):
        return (f"Model `{model['arch']}` with weights `{model['pretrained']}` on {', '.join(data['datasets'])}; "
                "compare with the paper only for its own weights, datasets and protocol.")
    if all(d.startswith("synth/") for d in data["datasets"]):
        return ("Default profile: a small CLIP trained here on a generated world. These numbers describe that "
                "model on that world; they are **not** the paper's numbers.")
    return (f"A small CLIP (`{model['arch']}`) trained here on {data['datasets'][0]}'s train split with captions made "
            "from its templates. These numbers describe that model; they are **not** the paper's numbers.")


def _interval(x: dict) -> str:
    """'-1.7 [-2.4, -1.0]*' in points; * when the 95% interval excludes zero."""
    return (f"{100 * x['diff']:+.1f} [{100 * x['lo']:+.1f}, {100 * x['hi']:+.1f}]" + ("*" if x["excludes_zero"] else ""))


def differences_markdown(intervals: dict, datasets: list[str]) -> list[str]:
    """Each row's difference in top-1 (points) against full per dataset and on the mean, and against random and the
    best other pruned row on the mean, with paired-bootstrap 95% intervals."""
    short = [d.split("/")[-1] for d in datasets]
    lines = ["## Differences (top-1 points, paired bootstrap 95% interval over test images; * excludes zero)", "",
             "| method | vs full: " + " | ".join(short) + " | vs full: mean | vs random: mean | vs best other: mean |",
             "|---|" + "---|" * (len(short) + 3)]
    for m, vs in intervals.items():
        full = vs.get("vs_full")
        cells = [_interval(full[d]) if full else "" for d in datasets] + [_interval(full["mean"]) if full else ""]
        cells.append(_interval(vs["vs_random"]["mean"]) if "vs_random" in vs else "")
        best = vs.get("vs_best_other")
        cells.append(f"{_interval(best['mean'])} ({best['against']})" if best else "")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines + [""]


def summary_markdown(metrics: dict, flops: dict, *, params: dict, predictor: Optional[dict]) -> str:
    """The table a paper would print, with the configuration behind every figure."""
    datasets = list(metrics["datasets"])
    methods = list(metrics["mean"])
    short = [d.split("/")[-1] for d in datasets]
    lines = ["# clipprune results", "", provenance(params), "",
             "| method | " + " | ".join(short) + " | mean | GFLOPs | setting |",
             "|---|" + "---|" * (len(short) + 3)]
    first = flops["datasets"][datasets[0]]
    for m in methods:
        accs = " | ".join(f"{100 * metrics['datasets'][d][m]['acc1']:.1f}" for d in datasets)
        setting = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in first[m]["setting"].items()
                            if k not in ("path",))
        lines.append(f"| {m} | {accs} | {100 * metrics['mean'][m]['acc1']:.1f} | {metrics['mean'][m]['gflops']:.4f} | {setting} |")
    lines += ["", f"GFLOPs: {flops['convention']}; fvcore agrees with the formula (see reports/flops.json).",
              "Baselines are matched to the predictor's GFLOPs (its own cost included) within 1%; the golden oracle keeps "
              "the predictor's token count; `+tokens` rows include the learned visual tokens' cost.", ""]
    if "intervals" in metrics:
        lines += differences_markdown(metrics["intervals"], datasets)
    if predictor:
        lines += ["## Predictor fidelity (test split vs its golden ranking)", ""]
        lines += [f"- {k}: {v}" for k, v in predictor.items()] + [""]
    lines += ["## Configuration", "", "```yaml", json.dumps(params, indent=2, sort_keys=True), "```", ""]
    return "\n".join(lines)
