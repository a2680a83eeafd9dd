"""The command: `collect` -> tables, plots and report.md in OUTDIR (`write_report`), and the
summary printed to the terminal (`main`, the argparse of `mlbreg report`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from .aggregate import aggregate, aggregate_layers
from .collect import Collection, ReportError, collect
from .envs import environment_notes
from .masks import mask_runs
from .tables import cpu_time_table, layers_table, mask_init_table, results_table, to_latex, to_markdown, write_table


def excluded_runs(runs: pd.DataFrame) -> pd.DataFrame:
    return runs.loc[~runs["included"].astype(bool), ["run", "status", "reason"]].reset_index(drop=True)


def noted_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """Finished runs whose result deserves a look (every prunable weight zero), with the note."""
    if "note" not in runs:
        return pd.DataFrame(columns=["run", "note"])
    return runs.loc[runs["note"].fillna("").astype(bool), ["run", "note"]].reset_index(drop=True)


def write_report(
    collection: Collection, out: Path, plots: bool = True, dpi: int = 150, masks: int = 4
) -> dict[str, list[Path]]:
    """All tables and plots of `collection` into `out`; returns the written files by kind.
    `masks`: mask pictures for up to that many configurations per (dataset, model)."""
    out.mkdir(parents=True, exist_ok=True)
    runs, metrics = collection.runs, collection.metrics
    agg = aggregate(runs)
    layer_agg = aggregate_layers(collection.layers, runs, agg)
    written: dict[str, list[Path]] = {"data": [], "tables": [], "plots": []}
    runs.to_csv(out / "runs.csv", index=False)
    metrics.to_csv(out / "metrics.csv", index=False)
    collection.layers.to_csv(out / "layer_epochs.csv", index=False)
    excluded = excluded_runs(runs)
    excluded.to_csv(out / "excluded.csv", index=False)
    written["data"] += [out / "runs.csv", out / "metrics.csv", out / "layer_epochs.csv", out / "excluded.csv"]
    sections = [
        f"# mlbreg report\n\n{int(runs['included'].sum())} of {len(runs)} runs included "
        f"(finished, every epoch in metrics.csv); values are mean ± std (ddof=1) over the n seeds.\n"
    ]
    env_lines = environment_notes(collection)
    if env_lines:
        sections.append("## Environments\n\n" + "\n".join(f"- {line}" for line in env_lines) + "\n")
    if not agg.empty:
        agg.to_csv(out / "aggregate.csv", index=False)
        written["data"].append(out / "aggregate.csv")
        tables = [("results", "Results (Table 1)", results_table(agg), results_table(agg, latex=True))]
        mask = mask_init_table(agg)
        if mask is not None:
            tables.append(("mask_init", "Mask initialization (Table 2)", mask, mask_init_table(agg, latex=True)))
        cpu = cpu_time_table(agg)
        if cpu is not None:
            tables.append(("cpu_time", "Training time split (Figure 2)", cpu, None))
        for name, title, table, latex in tables:
            written["tables"] += write_table(table, out, name, latex)
            sections.append(f"## {title}\n\n{to_markdown(table)}")
        layer_table = layers_table(layer_agg)
        if layer_table is not None:
            # layers.csv holds the numbers (means, stds, counts); .md and .tex the formatted table
            paths = [out / "layers.csv", out / "layers.md", out / "layers.tex"]
            layer_agg.to_csv(paths[0], index=False)
            paths[1].write_text(to_markdown(layer_table))
            paths[2].write_text(to_latex(layers_table(layer_agg, latex=True)))
            written["tables"] += paths
            sections.append(f"## Per-layer density (final epoch)\n\n{to_markdown(layer_table)}")
    if len(excluded):
        sections.append(f"## Excluded runs ({len(excluded)})\n\n{to_markdown(excluded)}")
    noted = noted_runs(runs)
    if len(noted):
        sections.append(f"## Notes ({len(noted)})\n\n{to_markdown(noted)}")
    if plots:
        from .plots import make_plots  # matplotlib only when plotting

        drawn, notes = mask_runs(collection, agg, masks)
        written["plots"] = make_plots(agg, metrics, out, dpi=dpi, layers=collection.layers, layer_agg=layer_agg, masks=drawn)
        pngs = [p for p in written["plots"] if p.suffix == ".png"]
        if pngs:
            sections.append("## Plots\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in pngs) + "\n")
        if notes:
            sections.append("## Mask pictures not drawn\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    (out / "report.md").write_text("\n".join(sections))
    written["data"].append(out / "report.md")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mlbreg report",
        description="Tables (CSV, Markdown, LaTeX) and plots (PNG, PDF) from run or sweep directories. "
        "Unfinished, diverged and failed runs are listed and left out of the means.",
    )
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="run or sweep directories (searched recursively)")
    parser.add_argument("--out", metavar="OUTDIR", help="where to write (default: DIR/report of the first DIR)")
    parser.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="OVERRIDES",
        help="only the runs of `mlbreg train -m OVERRIDES` (one quoted string, e.g. "
        "'+experiment=table1_resnet18'); runs it makes that are not found are listed as "
        "missing. Repeat for several sweeps.",
    )
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    parser.add_argument("--dpi", type=int, default=150, help="resolution of the PNG plots (default 150)")
    parser.add_argument(
        "--masks",
        type=int,
        default=4,
        metavar="N",
        help="mask pictures (model.pt of one run per configuration) for up to N sparse "
        "configurations per dataset and architecture, one per method first (default 4; 0: none)",
    )
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else Path(args.dirs[0]) / "report"
    try:
        collection = collect(args.dirs, args.sweep)
    except ReportError as err:
        print(f"mlbreg report: {err}", file=sys.stderr)
        return 2
    written = write_report(collection, out, plots=not args.no_plots, dpi=args.dpi, masks=args.masks)
    runs = collection.runs
    print(
        f"{len(runs)} runs, {int(runs['included'].sum())} included in the tables and plots"
        + (
            f" ({collection.outside_sweep} other runs under {', '.join(args.dirs)} are not in --sweep)"
            if collection.outside_sweep
            else ""
        )
    )
    excluded = excluded_runs(runs)
    if len(excluded):
        print(f"excluded from the means ({len(excluded)}):")
        for row in excluded.itertuples(index=False):
            detail = row.reason if row.reason and row.reason != row.status else ""
            print(f"  {row.run}  [{row.status}]  {detail}".rstrip())
    for row in noted_runs(runs).itertuples(index=False):
        print(f"note: {row.run}: {row.note}")
    for line in environment_notes(collection):
        print(line)
    results = out / "results.md"
    if results.exists():
        print("\n" + results.read_text())
    else:
        print("no finished run: no tables or plots")
    count = sum(len(v) for v in written.values())
    print(f"wrote {count} files to {out}/ (report.md shows the tables and plots)")
    return 0
