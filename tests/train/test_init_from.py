"""GRC-tuning from an import directory (`train.init_from`): execution options may differ from the
import's (dtype, remat, attention layout, scanned layers: converted), floats compare at float32
precision; a different architecture or latent count is refused by key; the frozen base stays
bit-identical to the imported weights."""

import json

import jax
import numpy as np
import pytest

from grc_jax.checkpoints import save_params
from grc_jax.core.config import load_config, save_config
from grc_jax.core.errors import ConfigError
from grc_jax.data.synth import synthesize
from grc_jax.model import init_params, unstack_layers
from grc_jax.train.loop import train
from tests.helpers import TINY_MODEL, word_tokenizer
from tests.train.test_train_loop import ROOT


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(data dir, import dir): a random one-layer model saved as `grc import-hf` writes it."""
    data = tmp_path_factory.mktemp("synth")
    synthesize(data, seed=0, queries_per_doc=1)
    words = set()
    for line in (data / "train.jsonl").read_text().splitlines():
        rec = json.loads(line)
        for text in [rec["query"], rec["positive"], rec.get("reasoning", ""), *rec["negatives"],
                     f"answer : {rec.get('answer', '')}"]:  # fmt: skip
            words.update(text.split())
    out = tmp_path_factory.mktemp("import")
    word_tokenizer(out, sorted(words))
    vocab = len(words) + 4
    cfg = load_config(
        ROOT / "configs" / "tiny.yaml",
        [*TINY_MODEL, f"model.vocab_size={vocab}", "model.rms_norm_eps=9.999999747378752e-06",
         f"train.init_from={out}", f"data.tokenizer={out}/tokenizer.json"],
    )  # fmt: skip
    save_config(cfg, out / "config.yaml")
    save_params(init_params(cfg.model, cfg.grc, jax.random.key(3)), out / "params")
    return data, out


def _run_cfg(data, imp, tmp_path, *extra):
    return load_config(
        imp / "config.yaml",
        [f"data.train_path={data}/train.jsonl", f"data.eval_path={data}/validation.jsonl",
         f"train.output_dir={tmp_path}", "train.run_name=tune", "train.steps=2",
         "train.warmup_steps=1", "train.eval_every=1000", "train.eval_queries=2", *extra],
    )  # fmt: skip


@pytest.mark.slow  # long: `make test-all` (README, Tests)
def test_tune_with_other_execution_options_keeps_the_base(base, tmp_path):
    data, imp = base
    cfg = _run_cfg(
        data, imp, tmp_path, "train.freeze_base=true", "train.lora_rank=2",
        "model.scan_layers=true", "model.attention_layout=head_major",
        "model.remat_policy=full", "model.rms_norm_eps=1e-5",
    )  # fmt: skip
    result = train(cfg, quiet=True)
    assert result["step"] == 2
    imported = load_config(imp / "config.yaml")
    from grc_jax.checkpoints import load_imported

    _, want = load_imported(imp)
    got = result["state"].params
    assert "layers" in got.model  # converted to the scanned layout
    flat_got = jax.tree_util.tree_flatten_with_path(unstack_layers(got.model, 1))[0]
    flat_want = dict(
        (jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_flatten_with_path(want)[0]
    )
    for path, value in flat_got:
        key = jax.tree_util.keystr(path)
        if "latents" in key:
            assert not np.array_equal(np.asarray(value), np.asarray(flat_want[key]))
        else:
            np.testing.assert_array_equal(np.asarray(value), np.asarray(flat_want[key]), key)
    assert any(float(np.abs(f["b"]).max()) > 0 for f in got.lora.values())
    assert imported.model.scan_layers is False


@pytest.mark.parametrize(
    "override,named",
    [("model.d_ff=96", "model.d_ff: 64 (imported) -> 96"),
     ("grc.num_latents=8", "grc.num_latents: 4 (imported latent table) -> 8")],
)  # fmt: skip
def test_a_different_model_is_refused_by_key(base, tmp_path, override, named):
    data, imp = base
    cfg = _run_cfg(data, imp, tmp_path, "train.freeze_base=true", override)
    with pytest.raises(ConfigError, match="train.init_from=") as e:
        train(cfg, quiet=True)
    assert named in str(e.value)
