"""The report of launch/experiment.py: results.md (tables of the paired
differences, per organ, power notes, per-run rows), the matplotlib plot,
results.json and the marked section of docs/results.md. No flags, no
training: it renders the dict ``launch.experiment.build_results`` returns.
Files are written under a temporary name and renamed (no TensorFlow
import, unlike rr_tf.data.records.atomic_write_text)."""

import json
import math
import os
import shutil

PLOT_HINT = "pip install -e .[plots] (matplotlib)"
ORGANS = ("liver", "spleen", "kidney_right", "kidney_left", "stomach", "pancreas",
          "gallbladder", "aorta", "ivc", "bone")


def _write_atomic(path, data, mode="w"):
    with open(path + ".tmp", mode) as f:
        f.write(data)
    os.replace(path + ".tmp", path)


def _dump(obj):
    return json.dumps(_json_safe(obj), indent=1)


def _json_safe(obj):
    """NaN and infinities -> None (JSON has neither), tuples -> lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


# --------------------------------------------------------------------------- report

def _f(v, fmt=".3f"):
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def _ci(ci, fmt="+.3f"):
    if ci is None or ci[0] is None or (isinstance(ci[0], float) and math.isnan(ci[0])):
        return "n/a"
    return f"[{ci[0]:{fmt}}, {ci[1]:{fmt}}]"


def report_markdown(res):
    """results.md (also the marked section of docs/results.md)."""
    s, table = res["settings"], res["results"]
    budgets = [b for b in map(str, s["num_labeled"]) if b in table]
    arms = res.get("arms") or ["scratch"] + list(s["methods"])
    lines = []
    if res["preset"] == "quick":
        widths = [n["ci_half_width"] for row in res["power"].values() for n in row.values()
                  if n["ci_half_width"] is not None and not math.isnan(n["ci_half_width"])]
        width = (f"its 95 % intervals of the paired difference have half-widths of "
                 f"{min(widths):.3f}-{max(widths):.3f} Dice, so differences smaller than that "
                 "are not resolved" if widths else
                 "with fewer than two paired seeds it has no interval at all")
        lines += [f"**This is the quick preset** ({s['seeds']} seed(s), {s['finetune_steps']} "
                  f"fine-tuning steps, {s['pretrain_steps']} pre-training steps, sized for "
                  f"about an hour on 2 CPU cores): {width}; `--preset=full` (8 seeds, the "
                  "recipe's schedule) is the experiment sized to resolve 5 Dice points at 1 "
                  "labelled case.", ""]
    d = res["data"] or {}
    lines += [f"Preset `{res['preset']}`. Mean foreground Dice over the 10 organs and the "
              f"{s['test_cases']} held-out test phantoms (data seed {s['test_seed']}), per seed; "
              f"fine-tuning from `{s['recipe']}` ({s['finetune_steps']} steps) on "
              f"{s['finetune_cases']} labelled-set phantoms (data seed {s['labelled_seed']}, "
              f"{s['finetune_spacing']} mm); pre-training on a pool of {s['pool_cases']} "
              f"phantoms (data seed {s['pool_seed']}, {s['pool_spacing']} mm)"
              + (", phantom seeds of the three sets checked disjoint" if d.get("disjoint") else "")
              + ". Paired design: seed s gives every arm the same labelled cases, data order "
              "and initialisation of new layers; Δ = arm − scratch per seed, its mean and "
              f"95 % percentile bootstrap interval ({s['resamples']} resamples).", ""]
    lines += ["| arm | " + " | ".join(f"{b} labelled: Dice (n) | Δ vs scratch [95 % CI]"
                                      for b in budgets) + " |",
              "|---|" + "---|---|" * len(budgets)]
    for a in arms:
        cells = []
        for b in budgets:
            e = table[b].get(a)
            if e is None:
                cells += ["–", "–"]
                continue
            cells.append(f"{_f(e['mean'])} ({len(e['dice'])})")
            cells.append("reference" if a == "scratch" else
                         f"{_f(e.get('diff_mean'), '+.3f')} {_ci(e.get('diff_ci95'))}")
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    controlled = [a for a in arms if any("vs_control" in table[b].get(a, {}) for b in budgets)]
    if controlled:
        lines += ["", "The pre-trained weights against the same segmenter from random weights "
                  "(arm `<method>-random`, `launch/finetune.py --load_weights=false`; same seeds, "
                  "cases and data order): Δ = method − its control per seed. The difference to "
                  "scratch above mixes this with the architecture's own effect.", "",
                  "| method | " + " | ".join(f"{b} labelled: Δ vs own architecture [95 % CI]"
                                            for b in budgets) + " |",
                  "|---|" + "---|" * len(budgets)]
        for a in controlled:
            cells = []
            for b in budgets:
                v = table[b].get(a, {}).get("vs_control")
                cells.append("–" if v is None else
                             f"{_f(v.get('diff_mean'), '+.3f')} {_ci(v.get('diff_ci95'))} "
                             f"(n={len(v.get('diffs') or [])})")
            lines.append(f"| {a} | " + " | ".join(cells) + " |")
    organs = [o for o in ORGANS if any(o in e["organs"] for row in table.values()
                                       for e in row.values())]
    if organs and len(arms) > 1:
        lines += ["", "Per organ: Δ vs scratch (mean over seeds) [95 % CI]:", "",
                  "| arm, budget | " + " | ".join(organs) + " |",
                  "|---|" + "---|" * len(organs)]
        for a in arms[1:]:
            for b in budgets:
                e = table[b].get(a)
                if e is None:
                    continue
                lines.append(f"| {a}, {b} | " + " | ".join(
                    f"{_f(e['organs'].get(o, {}).get('diff_mean'), '+.2f')} "
                    f"{_ci(e['organs'].get(o, {}).get('diff_ci95'), '+.2f')}" for o in organs) + " |")
    if res["power"]:
        lines += ["", "Seeds: the interval's half-width is about 2.0 s / sqrt(n) for n seeds "
                  "whose paired differences have std s; resolving 0.05 Dice needs "
                  "n >= (2.0 s / 0.05)^2.", "",
                  "| arm, budget | n | std of Δ (s) | bootstrap half-width | 2.0 s / sqrt(n) | "
                  "seeds for ±0.05 |", "|---|---|---|---|---|---|"]
        for b in budgets:
            for a, n in res["power"].get(b, {}).items():
                lines.append(f"| {a}, {b} | {n['n']} | {_f(n['diff_std'])} | "
                             f"{_f(n['ci_half_width'])} | {_f(n['half_width'])} | "
                             f"{_f(n['seeds_for_0.05'], 'd') if isinstance(n['seeds_for_0.05'], int) else '–'} |")
    if res["pretraining"]:
        lines += ["", "Pre-training compute (on the pool):", "",
                  "| method | steps x batch | wall time |", "|---|---|---|"]
        for m, p in res["pretraining"].items():
            lines.append(f"| {m} | {p['steps']} x {p['batch']} = {p['steps_x_batch']} | "
                         f"{p.get('wall_s', 0) / 60:.1f} min |")
    if res["runs"]:
        lines += ["", "Per fine-tuning (from the score files): segmenter, pre-trained variables "
                  "loaded, test Dice, the validation step whose weights were kept, wall time "
                  "of fine-tuning + inference + scoring:", "",
                  "| run | segmenter | loaded | Dice | kept val step (Dice) | wall min |",
                  "|---|---|---|---|---|---|"]
        for r in res["runs"]:
            best = r.get("best_val") or {}
            kept = (f"{best['step']} ({_f(best.get('dice'))})" if best.get("step") is not None
                    else "–")
            lines.append(f"| {r['arm']}_n{r['budget']}_s{r['seed']} | {r.get('segmenter')} | "
                         f"{r.get('loaded', 0)} | {_f(r['dice'])} | {kept} | "
                         f"{_f((r.get('wall_s') or math.nan) / 60, '.1f')} |")
    walls = [r["wall_s"] for r in res["runs"] if r.get("wall_s")]
    if walls:
        lines += ["", f"Fine-tuning + inference + scoring: {len(walls)} runs, "
                  f"{min(walls) / 60:.1f}-{max(walls) / 60:.1f} min each, "
                  f"{sum(walls) / 60:.0f} min in all (wall time)."]
    return "\n".join(lines)


def plot_results(res, path):
    """dice_vs_labels.png with matplotlib: left, each arm's mean Dice per
    budget with its 95 % bootstrap interval; right, the paired difference
    arm - scratch with its interval. Returns False (nothing written) when
    matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    table, s = res["results"], res["settings"]
    budgets = [b for b in s["num_labeled"] if str(b) in table]
    arms = res.get("arms") or ["scratch"] + list(s["methods"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    offsets = {a: (i - (len(arms) - 1) / 2) * 0.04 for i, a in enumerate(arms)}

    def draw(ax, arm, key, ci_key):
        xs, ys, lo, hi = [], [], [], []
        for b in budgets:
            e = table[str(b)].get(arm)
            if e is None or e.get(key) is None or math.isnan(e[key]):
                continue
            ci = e.get(ci_key) or (math.nan, math.nan)
            ci = [math.nan if c is None else c for c in ci]
            xs.append(b * (1 + offsets[arm]))
            ys.append(e[key])
            lo.append(e[key] - ci[0] if not math.isnan(ci[0]) else 0.0)
            hi.append(ci[1] - e[key] if not math.isnan(ci[1]) else 0.0)
        if xs:
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=arm,
                        color=f"C{arms.index(arm) % 10}")  # one colour per arm in both panels

    for a in arms:
        draw(left, a, "mean", "mean_ci95")
        if a != "scratch":
            draw(right, a, "diff_mean", "diff_ci95")
    right.axhline(0.0, color="grey", lw=0.8, ls="--")
    for ax, ylabel, title in ((left, "mean Dice (held-out test)", "Dice per arm (95 % CI)"),
                              (right, "Dice difference vs scratch", "Paired difference (95 % CI)")):
        ax.set_xscale("log", base=2)
        ax.set_xlim(min(budgets) / 1.5, max(budgets) * 1.5)
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.minorticks_off()
        ax.set_xlabel("labelled cases")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    left.set_ylim(0.0, 1.0)
    fig.suptitle(f"Does pre-training help? (preset {res['preset']}, {s['seeds']} seed(s))")
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=120)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)
    return True


def write_results_section(path, md):
    """Replace the table between ``<!-- experiment:begin/end -->`` in
    ``path`` (the prose around it stays), or append it; written atomically."""
    begin, end = "<!-- experiment:begin -->", "<!-- experiment:end -->"
    section = f"{begin}\n{md}\n{end}"
    text = open(path).read() if os.path.exists(path) else "# Results\n"
    if begin in text and end in text:
        text = text[:text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    _write_atomic(path, text)


def write_outputs(out, res, docs=None):
    """results.json, results.md and the plot in ``out`` (and ``docs`` when
    given). Returns (markdown, whether the plot was written)."""
    md = report_markdown(res)
    plotted = plot_results(res, os.path.join(out, "dice_vs_labels.png"))
    if not plotted:
        md += (f"\n\nPlot skipped: matplotlib is not installed ({PLOT_HINT} gives "
               "dice_vs_labels.png).")
    _write_atomic(os.path.join(out, "results.json"), _dump(res))
    _write_atomic(os.path.join(out, "results.md"), md + "\n")
    if docs:
        _write_atomic(os.path.join(docs, "results.json"), _dump(res))
        if plotted:  # the same figure: copied, not drawn again
            shutil.copyfile(os.path.join(out, "dice_vs_labels.png"),
                            os.path.join(docs, "dice_vs_labels.png"))
        write_results_section(os.path.join(docs, "results.md"), md)
    return md, plotted
