"""Benchmark helpers: interleaved timing with warm-up and medians, tables, JSON, machine info.

A benchmark compares implementations side by side in one run (CONVENTIONS.md "Benchmarks and
numbers"): every repeat runs each candidate once, in a rotated order, after an untimed warm-up
round, and the reported figure is the median over repeats.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax

from grc_jax.data.schema import GRCRecord, parse_record
from grc_jax.data.synth import synthesize
from grc_jax.data.tokenizer import Tokenizer, train_sentencepiece

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# --quick (smoke runs): a 2-layer model on short rows.
QUICK_OVERRIDES = [
    "model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2",
    "model.head_dim=16", "model.d_ff=128", "grc.num_latents=4", "data.seq_len=128",
    "data.batch_size=8",
]  # fmt: skip


def interleaved_times(
    candidates: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Wall seconds of each candidate per repeat; `warmup` untimed rounds first.

    Each callable must block until its work is done (e.g. `jax.block_until_ready`). Repeat r runs
    the candidates in the order rotated by r, so no candidate always runs first (or right after
    the same neighbour) on a machine whose load drifts.
    """
    if repeats < 1:
        raise ValueError(f"repeats: expected a positive integer, got {repeats}")
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            t0 = time.perf_counter()
            candidates[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or `platform.processor()` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """How to rerun: `python -m <module> <args>` (`argv` None: this process's own arguments)."""
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python -m", module, *args])


def machine(command: str) -> dict[str, Any]:
    """What runs the benchmark: CPU, cores, load, JAX version and devices, date, `command`.

    Call it at the start; `finish_machine` adds the load average at the end.
    """
    devices = jax.devices()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    import jaxlib

    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "backend": jax.default_backend(),
        "devices": f"{len(devices)} x {devices[0].device_kind}",
        "command": command,
    }


def finish_machine(info: dict[str, Any]) -> dict[str, Any]:
    info["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    return info


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-markdown table; floats get 4 significant digits."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in lines)) for i, h in enumerate(headers)]
    out = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"]
    out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    out += [
        "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in lines
    ]
    return "\n".join(out)


def write_json(path: str | Path, payload: Mapping[str, Any]) -> Path:
    """Write `payload` as indented JSON (parent directories created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return path


def describe(info: Mapping[str, Any]) -> str:
    """One paragraph about the machine, for the printed report."""
    return (
        f"{info['date_utc']}  {info['cpu_model']} ({info['usable_cores']} usable cores, load "
        f"{info['load_average']} at start, {info.get('load_average_end')} at end)  "
        f"jax {info['jax']} on {info['devices']}\n"
        f"command: {info['command']}"
    )


def load_records(n: int, seed: int, directory: Path) -> list[GRCRecord]:
    """The first `n` records of the synthetic train split, written to `directory`."""
    synthesize(directory, seed=seed)
    path = directory / "train.jsonl"
    lines = path.read_text().splitlines()
    if n > len(lines):
        raise ValueError(f"--records={n}: the synthetic train split has only {len(lines)} records")
    return [parse_record(line, f"{path}:{i + 1}") for i, line in enumerate(lines[:n])]


def build_tokenizer(records: list[GRCRecord], directory: Path, vocab_size: int) -> Tokenizer:
    """A sentencepiece tokenizer trained on the records' texts (as `grc train` trains its own)."""
    texts = []
    for r in records:
        texts += [r.query, r.reasoning, f"answer : {r.answer}", r.positive, *r.negatives]
    return train_sentencepiece(texts, directory / "tokenizer", vocab_size)
