"""`grc data real`: every real-text source into `<out>/<source>/`, and their splits merged (shuffled
with the seed) into `<out>/`, with a source count table in `<out>/stats.json`."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from grc_jax.data.real_text.build import (
    BuildOptions,
    Source,
    build_records,
    merge_outputs,
    write_output,
)


def build_merged(
    out_dir: str | Path,
    sources: dict[str, Callable[[], Source]],
    opts: BuildOptions,
    report: Callable[[dict], None] = lambda stats: None,
) -> tuple[dict[str, dict], dict[str, dict[str, int]]]:
    """Build each source (made by its factory, in name order) and merge. Returns (stats by
    source, table split -> source -> records). `report(stats)` is called after each source."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    parts, all_stats = {}, {}
    for name in sorted(sources):
        started = time.perf_counter()
        splits, stats = build_records(sources[name](), opts, started)
        write_output(out / name, splits, stats)
        parts[name], all_stats[name] = splits, stats
        report(stats)
    merged_stats = {
        "source": "merged",
        "seconds": round(time.perf_counter() - t0, 2),
        "options": vars(opts) | {"fractions": list(opts.fractions)},
    }
    table = merge_outputs(out, parts, opts.seed, merged_stats)
    return all_stats, table
