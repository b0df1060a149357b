"""Rewrite tests/golden/param_specs_*.json: the reviewed PartitionSpec of every parameter.

The only way golden files change: run `make golden`, then read the printed diff (and `git diff`)
before committing. The tables come from `grc_jax.model.sharding_report`, as in
`tests/core/test_sharding.py`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Before JAX starts: the golden meshes need 8 devices (simulated CPU ones, as in tests/conftest.py).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ["JAX_PLATFORMS"] = "cpu"

ROOT = Path(__file__).resolve().parent.parent
GOLDEN_DIR = ROOT / "tests" / "golden"


def main() -> int:
    import json

    from grc_jax.model.sharding_report import GOLDEN_CONFIGS, diff_documents, dumps, golden_document

    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    os.chdir(ROOT)  # the documents record config paths relative to the repository root
    for name in GOLDEN_CONFIGS:
        path = GOLDEN_DIR / f"param_specs_{name}.json"
        doc = golden_document(f"configs/{name}.yaml")
        old = json.loads(path.read_text()) if path.exists() else None
        path.write_text(dumps(doc) + "\n")
        if old is None:
            print(f"{path.relative_to(ROOT)}: written ({len(doc['params'])} parameters)")
            continue
        changes = diff_documents(old, doc)
        print(f"{path.relative_to(ROOT)}: {len(changes) or 'no'} change(s)")
        for line in changes:
            print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
