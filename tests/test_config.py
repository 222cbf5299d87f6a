from __future__ import annotations

import re
from pathlib import Path

import pytest

from ctnet_rec.config import ConfigError, load_config

from .conftest import DEMO_CONFIG


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cfg.toml"
    p.write_text(text)
    return p


def _demo_with(tmp_path: Path, old: str, new: str) -> Path:
    text = DEMO_CONFIG.read_text()
    assert old in text
    return _write(tmp_path, text.replace(old, new, 1))


def test_demo_config_loads(demo_config):
    f = demo_config.features
    assert f.table("item").num_embeddings == 100_000
    assert f.pooled_keys() == ["user_id", "seller_id", "age_group", "hour", "price"]
    assert f.sequence_keys() == ["item_id", "category_id", "hist_item_ids", "hist_category_ids",
                                 "long_hist_item_ids", "long_hist_category_ids"]
    assert f.sparse_keys() == f.pooled_keys() + f.sequence_keys()
    assert f.dense_names() == []  # price is bucketised
    assert demo_config.synth.domains["A"].impressions_per_period == 60_000
    # unspecified domain knobs keep their documented defaults
    assert demo_config.synth.domains["C"].new_item_rate == 0.40


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        ("[data]\n", "[data]\nbatchsize = 3\n", "data.batchsize"),
        ("batch_size = 512", 'batch_size = "512"', "data.batch_size"),
        ("batch_size = 512", "batch_size = 0", "data.batch_size"),
        ("batch_size = 512", "batch_size = 3", "data.batch_size"),
        ('target_domains = ["B", "C"]', 'target_domains = ["B", "C", "B"]',
         "experiment.target_domains"),
        ("num_embeddings = 40000", "num_embeddings = 0", "features.tables[0].num_embeddings"),
        ("num_embeddings = 40000", "num_embeddings = 4611686018427387903",  # 2^62 - 1
         "features.tables[0].num_embeddings"),
        ("sim_top_k = 32", "sim_top_k = 0", "model.sim_top_k"),
        ("attention_heads = 2", "attention_heads = 3", "model.attention_heads"),
        ("embedding_dim = 16", "embedding_dim = 1.5", "features.tables[0].embedding_dim"),
        ("embedding_dim = 8", "embedding_dim = 6", "features.tables[3].embedding_dim"),
        ("160.0]\nembedding_dim = 4", "160.0]\nembedding_dim = 2",
         "features.numeric[0].embedding_dim"),
        ('id_policy = "modulo"', 'id_policy = "random"', "features.id_policy"),
        ('table = "seller"', 'table = "sellers"', "features.id_features[3].table"),
        ("max_len = 30 ", "max_len = -1 ", "features.sequences[0].max_len"),
        ("[synth.domains.C]\n", "[synth.domains.C]\nuser_share = 1.5\n",
         "synth.domains.C.user_share"),
        ("periods = 16", "periods = true", "synth.periods"),
        ('sharding_type = "table_wise"', 'sharding_type = "diagonal"', "sharding.sharding_type"),
        ('# tables = { item = "row_wise" }', 'tables = { items = "row_wise" }',
         "sharding.tables.items"),
    ],
)
def test_bad_values_are_refused_with_key_named(tmp_path, old, new, key):
    with pytest.raises(ConfigError) as e:
        load_config(_demo_with(tmp_path, old, new))
    assert key in str(e.value)
    assert "cfg.toml" in str(e.value)


def test_missing_required_key(tmp_path):
    with pytest.raises(ConfigError, match=r"features: required key is missing"):
        load_config(_write(tmp_path, "[data]\nbatch_size = 4\n"))


def test_unknown_section(tmp_path):
    text = DEMO_CONFIG.read_text() + "\n[modle]\nx = 1\n"
    with pytest.raises(ConfigError, match=r"modle: unknown key"):
        load_config(_write(tmp_path, text))


def test_bad_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_write(tmp_path, "[features\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")


def test_duplicate_feature_names(tmp_path):
    cfg = _demo_with(tmp_path, 'name = "seller_id"', 'name = "user_id"')
    with pytest.raises(ConfigError, match="repeated: \\['user_id'\\]"):
        load_config(cfg)


def test_template_config_loads():
    cfg = load_config(DEMO_CONFIG.parent / "template.toml")
    assert cfg.features.table("item").num_embeddings == 50_000_000
    assert [s.max_len for s in cfg.features.sequences] == [50, 1000]


def test_shared_long_sequence_attention_needs_sim_or_eta(tmp_path):
    """Sharing needs SIM or ETA; the source reading the target's interests does not (without
    them it has none to read: `source_long_interest` then changes nothing)."""
    text = DEMO_CONFIG.read_text().replace("use_sim = true", "use_sim = false") \
        .replace("use_eta = true", "use_eta = false")
    path = tmp_path / "c.toml"
    for value in ('"own"', '"target"', '"target_for_adapters"'):
        path.write_text(re.sub("(?m)^source_long_interest = .*$",
                               f"source_long_interest = {value}", text))
        load_config(path)
    path.write_text(text.replace("share_long_sequence_attention = false",
                                 "share_long_sequence_attention = true"))
    with pytest.raises(ConfigError, match="ctnet.share_long_sequence_attention: the model has "
                                          "neither SIM nor ETA"):
        load_config(path)


def test_each_tower_reading_the_other_long_sequence_is_refused(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(DEMO_CONFIG.read_text().replace(
        "share_long_sequence_attention = false", "share_long_sequence_attention = true"))
    with pytest.raises(ConfigError, match="ctnet.source_long_interest: 'target_for_adapters' "
                                          "with share_long_sequence_attention would have"):
        load_config(path)
    path.write_text(DEMO_CONFIG.read_text().replace(
        'source_long_interest = "target_for_adapters"', 'source_long_interest = "theirs"'))
    with pytest.raises(ConfigError, match="source_long_interest"):
        load_config(path)


def test_a_model_setting_added_later_leaves_older_checkpoints_loadable(demo_config):
    """An older checkpoint's config has no `ctnet.output_fusion`: off, the hash is the one it
    recorded, and only model settings are named when a hash differs."""
    import copy
    import dataclasses
    import hashlib
    import json

    from ctnet_rec.config import ADDED_LATER

    off = copy.deepcopy(demo_config)
    for (section, key), value in ADDED_LATER.items():  # as CTNet was before they existed
        setattr(getattr(off, section), key, value)

    older = {s: dataclasses.asdict(getattr(off, s)) for s in ("model", "ctnet")}
    for section, key in ADDED_LATER:  # none of the settings added since
        del older[section][key]
    for key in ("source_lag", "adapter_optimizer", "adapter_prequential_pass"):
        del older["ctnet"][key]  # how it trains: never hashed (as the fusion's fit settings)
    recorded = hashlib.sha256(json.dumps(older, sort_keys=True).encode()).hexdigest()[:16]
    assert off.section_hash("model", "ctnet") == recorded
    on = copy.deepcopy(off)
    on.ctnet.output_fusion = True
    assert on.section_hash("model", "ctnet") != recorded
    as_written = dataclasses.asdict(off)
    as_written["ctnet"].pop("output_fusion")
    as_written["ctnet"]["source_lag"] = 0
    assert off.section_differences(as_written, "model", "ctnet") == []
    assert on.section_differences(as_written, "model", "ctnet") == [
        "ctnet.output_fusion: checkpoint None vs config True"]
    # read back from such a record, the setting is off whatever today's default
    from ctnet_rec.config import recorded_config
    assert recorded_config(as_written).ctnet.output_fusion is False
    assert recorded_config(as_written).ctnet.source_long_interest == "own"


def test_a_run_recorded_before_the_pooled_guard_keeps_fitting_as_it_did(demo_config):
    """A CTNet recorded before `output_fusion_min_z` and `output_fusion_evidence` existed
    fitted its fusion weight on each period alone, unguarded: resumed by this version it goes
    on so (its served scores do not change rule mid-run), though today's defaults guard on
    pooled evidence; neither setting is in the hash."""
    import copy
    import dataclasses

    from ctnet_rec.config import recorded_config

    assert (demo_config.ctnet.output_fusion_min_z,
            demo_config.ctnet.output_fusion_evidence) == (1.96, "pooled")
    as_written = dataclasses.asdict(demo_config)
    for key in ("output_fusion_min_z", "output_fusion_evidence"):
        as_written["ctnet"].pop(key)
    older = recorded_config(as_written).ctnet
    assert (older.output_fusion, older.output_fusion_min_z,
            older.output_fusion_evidence) == (True, 0.0, "period")
    other = copy.deepcopy(demo_config)
    other.ctnet.output_fusion_min_z, other.ctnet.output_fusion_evidence = 0.0, "period"
    assert other.section_hash("model", "ctnet") == demo_config.section_hash("model", "ctnet")


def test_set_overrides_keys_as_toml_values_and_refuses_what_the_file_would():
    cfg = load_config(DEMO_CONFIG, ["train.seed=3", "ctnet.output_fusion=true",
                                    "train.device=cpu", "data.batch_size = 128",
                                    "model.mlp_hidden=[64, 32]", "train.dense.lr=0.05"])
    assert (cfg.train.seed, cfg.ctnet.output_fusion, cfg.data.batch_size) == (3, True, 128)
    assert cfg.model.mlp_hidden == [64, 32] and cfg.train.dense.lr == 0.05
    assert load_config(DEMO_CONFIG).train.seed == 0  # the file itself is untouched
    with pytest.raises(ConfigError, match=r"--set train\.sed=3.*train\.sed"):
        load_config(DEMO_CONFIG, ["train.sed=3"])
    with pytest.raises(ConfigError, match=r"data\.batch_size"):
        load_config(DEMO_CONFIG, ["data.batch_size=-1"])
    with pytest.raises(ConfigError, match=r"expected SECTION\.KEY=VALUE"):
        load_config(DEMO_CONFIG, ["train.seed"])
    with pytest.raises(ConfigError, match=r"train\.seed is not a table"):
        load_config(DEMO_CONFIG, ["train.seed.x=1"])


def test_the_command_line_sets_keys_and_says_its_version(capsys):
    from ctnet_rec import __version__
    from ctnet_rec.cli import main

    assert main(["plan", "--config", str(DEMO_CONFIG), "--world-size", "2",
                 "--set", "sharding.sharding_type=row_wise"]) == 0
    assert "row_wise" in capsys.readouterr().out
    assert main(["plan", "--config", str(DEMO_CONFIG), "--world-size", "2",
                 "--set", "sharding.sharding_type=diagonal"]) == 2
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"ctnet {__version__}"
