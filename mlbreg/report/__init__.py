"""`mlbreg report DIR [DIR ...] [--out OUTDIR]`: run directories -> the paper's tables and plots.

The text files a run writes are read (config.yaml, status.json, metrics.csv or, when it is
missing, summary.csv, layers.csv, env.json), plus model.pt of a few runs for the mask
pictures: no checkpoint, no network, no dashboard.

Data flows one way, one submodule per step:

    run dirs -> `collect` -> runs frame (one row per run: config, status, final metrics,
                             summed timings) + metrics frame (one row per run and epoch)
                             + layers frame (one row per run, epoch and prunable layer)
                             + environments (env.json per run)                   [collect]
             -> `aggregate` -> one row per configuration: mean, std (ddof=1) and n over seeds
                `aggregate_layers` -> one row per configuration and layer (final epoch)
                                                                                 [aggregate]
                `environment_notes` -> the compared env.json fields that differ  [envs]
                `mask_runs` -> model.pt of one run per chosen configuration -> `LayerMask`s
                                                                                 [masks]
             -> tables (CSV, Markdown, LaTeX)                                    [tables]
                and plots (PNG, PDF)                          [plots, layer_plots, plot_style]
             -> report.md, the printed summary (`write_report`, `main`)          [command]

Names and colours on tables and plots: `mlbreg.labels`. How runs become configurations
(config ids, duplicates, the "Setting" column): `configs`.

Which runs count: a run is *included* when status.json says `finished` and metrics.csv
has a row for every epoch of its config. Every other run (running, interrupted, diverged,
failed, no status, truncated metrics) is listed by name with its status and the reason,
and left out of every mean, every plot and the environment comparison.

A configuration is the run's identifying config (`mlbreg.config.identity`) without the
seed, after blanking the keys the method does not use (λ and m for SGD, the init for the
dense-start methods, ...; `Method.unused_keys` of `mlbreg.methods`). So
`method=sgd,mllinbreg lam=0.5,1` counts SGD once, not once per λ: two runs with the same
configuration and seed are the same computation, and the second is counted as a duplicate,
not as another seed.
"""

from __future__ import annotations

from .command import main

__all__ = ["main"]
