"""The eval report: a markdown table, a heatmap of M per model, and a grid of samples per model."""
from __future__ import annotations

import os
from pathlib import Path

from ..files.atomic import atomic_file
from ..files.images import grid, save_png

GRID_COLUMNS = 8


def heatmap(entry: dict, names: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = entry["M"]
    rows = names if len(m) == len(names) and entry["kind"] != "model" else ["samples"]
    fig, ax = plt.subplots(figsize=(1.1 * len(names) + 2.2, 0.9 * len(rows) + 1.6))
    im = ax.imshow(m, cmap="viridis_r")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("teacher j")
    ax.set_ylabel("style i" if len(rows) > 1 else "")
    for i, row in enumerate(m):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.1f}", ha="center", va="center", color="white", fontsize=8)
    ax.set_title(f"{entry['name']}: FID matrix M, FID_t = {entry['fid_t']:.2f}", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def sample_grid(row, names: list[str], path: Path) -> Path:
    """Rows are styles (or the one sample set), columns are distinct prompts."""
    first = {}
    for k, prompt in enumerate(row.sets[0].prompts):
        first.setdefault(prompt, k)
        if len(first) == GRID_COLUMNS:
            break
    columns = list(first.values())
    images, labels = [], []
    for i, samples in enumerate(row.sets):
        pics = samples.images()
        for k in columns:
            images.append(pics[k])
            style = names[i] if len(row.sets) > 1 else row.name
            labels.append(f"{style}: {samples.prompts[k]}")
    return save_png(grid(images, labels, columns=len(columns), cell=128), path)


def _fmt(value, spec=".2f") -> str:
    return "–" if value is None else format(value, spec)


def markdown(metrics: dict, pictures: list[dict], output: Path) -> str:
    """The report; `pictures[i]` holds the heatmap and sample grid paths of `metrics["models"][i]`."""
    s = metrics["settings"]
    teachers = ", ".join(f"{t['name']} (`{t['ref']}`)" for t in metrics["teachers"])
    lines = [
        "# DMM evaluation",
        "",
        f"Teachers: {teachers}. {s['num_images']} samples per style ({s['distinct_prompts']} distinct prompts from "
        f"{s['prompts']}), sampler {s['scheduler']}, {s['steps']} steps, guidance {s['guidance']}, negative prompt "
        f"{s['negative']!r}, seed {s['seed']}"
        + (f", protocol {s['protocol']}" if s["protocol"] else "")
        + f". FID in the {s['features']} feature space ({s['feature_dims']} dimensions). FID_t = trace(M), lower is "
        "better; the reference compares each teacher with itself under other seeds. KID_t sums the same pairs' "
        "kernel distances (unbiased, so meaningful at small K).",
        "",
    ]
    if s["k_below_feature_dims"]:
        lines += [f"**Warning:** K = {s['num_images']} is below the {s['feature_dims']} feature dimensions: the FIDs "
                  "are biased and depend on K; compare them only at equal K, or read KID.", ""]
    lines += [
        "| model | kind | FID_t | FID_t / reference | KID_t | style accuracy | colour accuracy | CLIP score |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in sorted(metrics["models"], key=lambda e: e["fid_t"]):
        lines.append(f"| {e['name']} | {e['kind']} | {e['fid_t']:.2f} | {_fmt(e['fid_t_over_reference'], '.3f')} | "
                     f"{e['kid_t']:.4f} | {_fmt(e['style_accuracy'], '.1%')} | {_fmt(e['colour_accuracy'], '.1%')} | "
                     f"{_fmt(e['clip_score'])} |")
    lines += ["", "## Per model", ""]
    for e, pics in zip(metrics["models"], pictures):
        diag = ", ".join(f"{v:.2f}" for v in e["diag"])
        lines += [f"### {e['name']}", "", f"diag(M): {diag}", "",
                  f"![M]({os.path.relpath(pics['heatmap'], output)})",
                  f"![samples]({os.path.relpath(pics['grid'], output)})", ""]
    return "\n".join(lines)
