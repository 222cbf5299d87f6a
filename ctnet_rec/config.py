"""Configuration: TOML files loaded into dataclasses and validated before anything runs.

Every section is a dataclass; `load_config` walks the TOML tree against the dataclass fields,
so an unknown key, a value of the wrong type or an impossible value is refused with its dotted
key path (``features.tables[2].num_embeddings``) and the file named.
"""

import dataclasses
import hashlib
import json
import tomllib
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration the user must fix; the message names the file and the key."""


def _check(cond: bool, key: str, reason: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {reason}")


# ---------------------------------------------------------------------------------------------
# Features: the model's view of the Parquet data contract.
# ---------------------------------------------------------------------------------------------


IdPolicy = Literal["modulo", "hash", "managed"]


def _check_embedding_dim(dim: int, key: str) -> None:
    _check(dim > 0, f"{key}.embedding_dim", "must be > 0")
    # fbgemm's fused table kernels (every compute kernel offered, on the CPU as on GPUs)
    # refuse other widths at sharding, deep inside TorchRec
    _check(dim % 4 == 0, f"{key}.embedding_dim",
           f"{dim} is not a multiple of 4, which fbgemm's table kernels need")


@dataclass
class TableConfig:
    """One embedding table; several features may share it (item ids and behaviour items)."""

    name: str
    num_embeddings: int
    embedding_dim: int
    id_policy: IdPolicy | None = None  # None: the features' id_policy

    def validate(self, key: str) -> None:
        _check(self.name.isidentifier(), f"{key}.name", f"{self.name!r} is not an identifier")
        _check(0 < self.num_embeddings < 2**62, f"{key}.num_embeddings", "must be in (0, 2^62)")
        _check_embedding_dim(self.embedding_dim, key)
        # 2^48 values are 1 PiB in fp32, more than a cluster holds; larger counts also
        # overflow fbgemm's 64-bit offsets
        _check(self.num_embeddings * self.embedding_dim < 2**48, f"{key}.num_embeddings",
               f"{self.num_embeddings} rows x {self.embedding_dim} is over 2^48 values (1 PiB "
               "in fp32); `ctnet plan` sizes tables for a cluster")


@dataclass
class IdFeatureConfig:
    """A scalar int64 id column, pooled into one embedding per row."""

    name: str
    table: str
    column: str = ""  # defaults to `name`

    def __post_init__(self) -> None:
        self.column = self.column or self.name


@dataclass
class SequenceConfig:
    """A behaviour sequence: aligned item/category list columns, newest first.

    Lists longer than `max_len` are truncated to their first (newest) `max_len` entries.
    """

    name: str
    item_column: str
    category_column: str
    max_len: int
    item_table: str = "item"
    category_table: str = "category"
    kind: Literal["short", "long"] = "short"

    def validate(self, key: str) -> None:
        _check(self.max_len > 0, f"{key}.max_len", "must be > 0")


@dataclass
class NumericFeatureConfig:
    """A float/int column. With `boundaries` it is bucketised into an id feature whose table has
    len(boundaries) + 1 rows (bucket i holds values in [b[i-1], b[i])); without, it stays dense."""

    name: str
    column: str = ""
    boundaries: list[float] = field(default_factory=list)
    embedding_dim: int = 8

    def __post_init__(self) -> None:
        self.column = self.column or self.name

    def validate(self, key: str) -> None:
        b = self.boundaries
        _check(
            all(x < y for x, y in zip(b, b[1:], strict=False)),
            f"{key}.boundaries",
            "must be strictly increasing",
        )
        _check_embedding_dim(self.embedding_dim, key)

    @property
    def bucketized(self) -> bool:
        return bool(self.boundaries)


@dataclass
class FeatureConfig:
    """Which columns are used, how raw ids map into rows, and which features share tables.

    `id_policy`: "modulo" (default) maps a raw int64 id x to row x mod num_embeddings (always
    in [0, num_embeddings), negative ids included); "hash" first mixes the 64 bits (splitmix64)
    so ids with structure in their low bits (e.g. multiples of the table size) spread evenly;
    "managed" gives every id a row of its own (TorchRec's managed-collision modules, see
    `ctnet_rec/modules/id_mapping.py`) while the table has a free row or a row whose id was not
    seen for `evict_after_periods` periods. A table may override the policy (`id_policy` in
    `[[features.tables]]`): managed suits the large id tables, a small one (hours, age groups)
    is better served by modulo. A managed table keeps its last row for the ids it has no row
    for, and under several ranks it must be sharded row-wise.
    """

    tables: list[TableConfig]
    id_features: list[IdFeatureConfig]
    sequences: list[SequenceConfig] = field(default_factory=list)
    numeric: list[NumericFeatureConfig] = field(default_factory=list)
    id_policy: IdPolicy = "modulo"
    evict_after_periods: int = 2
    label_column: str = "label"
    user_column: str = "user_id"
    item_column: str = "item_id"
    category_column: str = "category_id"
    time_column: str = "ts"

    def validate(self, key: str) -> None:
        _check(len(self.tables) > 0, f"{key}.tables", "at least one table is required")
        names = [t.name for t in self.tables]
        _check(len(set(names)) == len(names), f"{key}.tables", f"duplicate table names {names}")
        for i, t in enumerate(self.tables):
            t.validate(f"{key}.tables[{i}]")
        for i, f in enumerate(self.id_features):
            _check(f.table in names, f"{key}.id_features[{i}].table", f"unknown table {f.table!r}")
        for i, s in enumerate(self.sequences):
            s.validate(f"{key}.sequences[{i}]")
            for attr in ("item_table", "category_table"):
                _check(
                    getattr(s, attr) in names,
                    f"{key}.sequences[{i}].{attr}",
                    f"unknown table {getattr(s, attr)!r}",
                )
        for i, n in enumerate(self.numeric):
            n.validate(f"{key}.numeric[{i}]")
        _check(self.evict_after_periods >= 1, f"{key}.evict_after_periods", "must be >= 1")
        keys = self.sparse_keys() + [n.name for n in self.numeric if not n.bucketized]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        _check(not dup, key, f"feature names must be unique, repeated: {dup}")

    # -- derived views used by the reader and the models --------------------------------------

    def table(self, name: str) -> TableConfig:
        return next(t for t in self.tables if t.name == name)

    def policy_of(self, table: str) -> IdPolicy:
        return self.table(table).id_policy or self.id_policy

    def managed_tables(self) -> set[str]:
        """Tables whose ids the model maps itself (the reader passes raw ids, mixed)."""
        return {t.name for t in self.tables if self.policy_of(t.name) == "managed"}

    def table_of(self, key: str) -> str | None:
        """The table a sparse key looks up (None for a bucketised numeric)."""
        for t, cols in self.columns_by_table().items():
            if key in cols:
                return t
        return None

    def for_model(self, model: "TowerConfig") -> "FeatureConfig":
        """These features less the behaviour sequences `model` never reads (the long one of a
        tower without SIM and ETA): neither read nor looked up, whose lookups' backward would
        cost a third of a DIN step for nothing. A tower reading no sequence keeps them all, so
        the target item and category stay in the sequence tables."""
        used = [s for s in self.sequences
                if (model.use_target_attention if s.kind == "short"
                    else model.use_sim or model.use_eta)]
        return dataclasses.replace(self, sequences=used) if used else self

    def sequence_tables(self) -> set[str]:
        return {t for s in self.sequences for t in (s.item_table, s.category_table)}

    def columns_by_table(self) -> dict[str, list[str]]:
        """The id columns each table embeds: scalar ids and behaviour sequences."""
        cols: dict[str, list[str]] = {}
        for f in self.id_features:
            cols.setdefault(f.table, []).append(f.name)
        for s in self.sequences:
            cols.setdefault(s.item_table, []).append(s.item_column)
            cols.setdefault(s.category_table, []).append(s.category_column)
        return cols

    def pooled_keys(self) -> list[str]:
        """Features embedded once per row (an EmbeddingBagCollection): scalar ids whose table no
        sequence uses, and bucketised numerics."""
        shared = self.sequence_tables()
        keys = [f.name for f in self.id_features if f.table not in shared]
        return keys + [n.name for n in self.numeric if n.bucketized]

    def sequence_keys(self) -> list[str]:
        """Features of the sequence tables (an EmbeddingCollection): the scalar ids that share a
        table with behaviours (the target item and category), then each sequence's item and
        category lists (keyed by column name)."""
        shared = self.sequence_tables()
        keys = [f.name for f in self.id_features if f.table in shared]
        for s in self.sequences:
            keys += [s.item_column, s.category_column]
        return keys

    def sparse_keys(self) -> list[str]:
        """Keys of the reader's KeyedJaggedTensor, in order: pooled keys, then sequence keys, so
        a model splits it in two with `kjt.split([len(pooled), len(sequence)])`."""
        return self.pooled_keys() + self.sequence_keys()

    def dense_names(self) -> list[str]:
        return [n.name for n in self.numeric if not n.bucketized]

    def required_columns(self) -> dict[str, str]:
        """Column name -> expected kind ("id", "list", "numeric", "label", "time")."""
        cols = {self.label_column: "label", self.time_column: "time", self.user_column: "id"}
        cols[self.item_column] = "id"
        for f in self.id_features:
            cols[f.column] = "id"
        for s in self.sequences:
            cols[s.item_column] = "list"
            cols[s.category_column] = "list"
        for n in self.numeric:
            cols[n.column] = "numeric"
        return cols


@dataclass
class TowerConfig:
    """A single-domain CTR tower (the paper's section 3.1); any of TA/SIM/ETA can be switched off.

    The defaults are the paper's: MLP [1024, 512, 256], SIM/ETA top-k 64."""

    mlp_hidden: list[int] = field(default_factory=lambda: [1024, 512, 256])
    attention_heads: int = 2
    use_target_attention: bool = True
    # the short sequence: "transformer" (a Transformer layer, then multi-head target attention:
    # the paper's tower) or "din" (DIN's activation unit over the raw behaviours: the DIN row)
    short_sequence: Literal["transformer", "din"] = "transformer"
    use_sim: bool = True
    use_eta: bool = True
    sim_top_k: int = 64
    eta_top_k: int = 64
    eta_hash_bits: int = 32
    leaky_relu_slope: float = 0.01

    def validate(self, key: str) -> None:
        _check(len(self.mlp_hidden) > 0 and all(h > 0 for h in self.mlp_hidden),
               f"{key}.mlp_hidden", "needs at least one layer, every size > 0")
        for name in ("attention_heads", "sim_top_k", "eta_top_k", "eta_hash_bits"):
            _check(getattr(self, name) > 0, f"{key}.{name}", "must be > 0")
        _check(self.eta_hash_bits <= 62, f"{key}.eta_hash_bits",
               "must be <= 62 (signatures are packed into one int64)")
        _check(self.leaky_relu_slope >= 0, f"{key}.leaky_relu_slope", "must be >= 0")


# ---------------------------------------------------------------------------------------------
# Data loading and the synthetic world.
# ---------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """How batches are read: size, bounded shuffle buffer, decode threads and prefetch depth."""

    batch_size: int = 512
    shuffle_buffer: int = 65536
    decode_threads: int = 2
    prefetch_batches: int = 8

    def validate(self, key: str) -> None:
        for name in ("shuffle_buffer", "decode_threads", "prefetch_batches"):
            _check(getattr(self, name) > 0, f"{key}.{name}", "must be > 0")
        _check(self.batch_size >= 4, f"{key}.batch_size", "must be >= 4 (a training step's "
               "batch norm needs two rows, and a rank's last batch may be split in two)")


@dataclass
class DomainWorldConfig:
    """One domain of the synthetic world; see `ctnet_rec.data.synth` for why each default."""

    impressions_per_period: int
    user_share: float
    item_share: float
    new_item_rate: float
    user_join_rate: float
    base_logit: float

    def validate(self, key: str) -> None:
        _check(self.impressions_per_period > 0, f"{key}.impressions_per_period", "must be > 0")
        for name in ("user_share", "item_share", "new_item_rate", "user_join_rate"):
            v = getattr(self, name)
            _check(0.0 <= v <= 1.0, f"{key}.{name}", f"must be in [0, 1], got {v}")


def _default_domains() -> dict[str, DomainWorldConfig]:
    # Full Taobao-like scale: A has 60x the impressions of B and 200x those of C.
    return {
        "A": DomainWorldConfig(1_200_000, 1.0, 1.0, 0.10, 0.02, -3.0),
        "B": DomainWorldConfig(20_000, 0.30, 0.30, 0.05, 0.05, -3.0),
        "C": DomainWorldConfig(6_000, 0.20, 0.30, 0.40, 0.08, -3.0),
    }


@dataclass
class SynthConfig:
    """Knobs of the synthetic continual cross-domain world (documented in data/synth.py)."""

    periods: int = 16
    period_seconds: int = 86_400
    start_ts: int = 1_700_000_000
    num_users: int = 200_000
    num_items_initial: int = 100_000
    new_items_per_period: int = 8_000
    num_categories: int = 200
    num_sellers: int = 10_000
    latent_dim: int = 16
    interest_drift: float = 0.25
    category_drift: float = 0.25
    category_affinity_weight: float = 1.0
    domain_gap: float = 0.2
    category_temperature: float = 1.0
    category_explore: float = 0.2
    item_spread: float = 0.5
    zipf_exponent: float = 1.0
    short_history_max: int = 50
    long_history_max: int = 256
    new_items_from_source: float = 0.85
    background_clicks: float = 8.0
    burn_in_periods: int = 4
    domains: dict[str, DomainWorldConfig] = field(default_factory=_default_domains)

    def validate(self, key: str) -> None:
        for name in (
            "periods", "period_seconds", "num_users", "num_items_initial", "num_categories",
            "num_sellers", "latent_dim", "short_history_max", "long_history_max",
        ):
            _check(getattr(self, name) > 0, f"{key}.{name}", "must be > 0")
        for name in ("interest_drift", "category_drift", "category_explore",
                     "new_items_from_source", "domain_gap"):
            v = getattr(self, name)
            _check(0.0 <= v <= 1.0, f"{key}.{name}", f"must be in [0, 1], got {v}")
        for name in ("new_items_per_period", "background_clicks", "burn_in_periods"):
            _check(getattr(self, name) >= 0, f"{key}.{name}", "must be >= 0")
        _check(self.zipf_exponent > 0, f"{key}.zipf_exponent", "must be > 0")
        _check(self.category_temperature > 0, f"{key}.category_temperature", "must be > 0")
        _check("A" in self.domains, f"{key}.domains", "the source domain 'A' is required")
        for name, d in self.domains.items():
            _check(name.isidentifier(), f"{key}.domains", f"bad domain name {name!r}")
            d.validate(f"{key}.domains.{name}")


OptimizerName = Literal["adagrad", "adam", "sgd"]


@dataclass
class OptimizerConfig:
    """A parameter group's optimiser (torch.optim): `adagrad` (the paper's), `adam` or `sgd`.

    `initial_accumulator` is AdaGrad's starting sum of squared gradients. At 0 (torch's
    default) AdaGrad's first step moves every weight by about +-lr whatever its gradient's
    size; TensorFlow's AdaGrad, which the paper used, starts at 0.1, so a weight moves in
    proportion to its gradient until the gradients have added up. It applies to parameters
    that start fresh: a group loaded from a checkpoint brings its own sums.
    `warmup_steps`: the lr ramps linearly from lr / warmup_steps at the first step to lr
    after `warmup_steps` steps (TorchRec's WarmupOptimizer; its step count is saved with the
    checkpoint, so a resumed run goes on with it)."""

    optimizer: OptimizerName = "adagrad"
    lr: float = 0.01
    initial_accumulator: float = 0.0
    warmup_steps: int = 0

    def validate(self, key: str) -> None:
        _check(0 < self.lr < float("inf"), f"{key}.lr", "must be a finite number > 0")
        _check(self.initial_accumulator >= 0, f"{key}.initial_accumulator", "must be >= 0")
        _check(self.optimizer == "adagrad" or self.initial_accumulator == 0,
               f"{key}.initial_accumulator", "is AdaGrad's; set it to 0 for "
               f"{self.optimizer}")
        _check(self.warmup_steps >= 0, f"{key}.warmup_steps", "must be >= 0")


def _adapter_optimizer() -> OptimizerConfig:
    return OptimizerConfig("adagrad", lr=0.1, initial_accumulator=0.1)


@dataclass
class CTNetConfig:
    """CTNet (the paper's section 3.3) and its variants: `adapter = "linear"` is CTNet
    w/o GLU; `source_refresh = "once"` is transfer-once (the source tower deployed at t0 is
    never reloaded); `share_long_sequence_attention` (section 4.7) lets the target tower reuse
    the source tower's SIM/ETA outputs, so the long-sequence work is done once."""

    adapter: Literal["glu", "linear"] = "glu"
    adapter_tap: Literal["same_layer", "previous_layer", "both"] = "same_layer"
    adapter_init_scale: float = 1e-5
    # a learned scalar per adapter, starting at 1, multiplying what it adds
    adapter_gate: bool = False
    # the source states the adapters read are layer-normalised (no affine): every tap at scale 1
    adapter_input_norm: bool = False
    source_refresh: Literal["every_period", "once"] = "every_period"
    # training on period t uses the newest source checkpoint of a period <= t - source_lag:
    # 1 is Algorithm 1 (the source in service while t's data arrives; CTNet and transfer-once
    # coincide at t0), 0 the source that has also trained on period t (a schedule where the
    # source finishes its period first). How it trains, not the model: not in the hash.
    source_lag: int = field(default=1, metadata={"model": False})
    share_long_sequence_attention: bool = False
    # the source tower's A_SIM/A_ETA: "own" (it computes them); "target" (it reads the
    # target's, detached, and looks up none of its long-sequence ids: no long-sequence work
    # in the source at all); "target_for_adapters" (the states the adapters read are
    # computed on the target's, in training and in scoring, while the source's logit, which
    # only the output fusion reads, in scoring, is its own: a training step skips the
    # source's long-sequence work). The target computes what it did either way, so CTNet
    # still starts as the target model. Without SIM and ETA, all three are "own". The default
    # by the rule of docs/experiment.md, "The source's long-sequence interests"
    source_long_interest: Literal["own", "target", "target_for_adapters"] = \
        "target_for_adapters"
    # the source's logit joins the served output, logit = target + w (source - c), w fitted
    # on each period's rows before they are trained on (the towers train as without it;
    # `training/output_fusion.py`); w = 0 at deployment, so CTNet starts as the target model.
    # The default by the regime map's rule (docs/experiment.md, "When transfer helps")
    output_fusion: bool = True
    # the fitted weight is kept only where it raises the fit rows' AUC over w = 0 by at least
    # this many standard errors of DeLong's paired test (1.96: beyond noise at 95%), else 0,
    # so a source whose logit helps the fit by chance gets no weight; 0 keeps the AUC-best
    # weight whatever its gain. How w is fitted, not the model: not in the hash
    output_fusion_min_z: float = field(default=1.96, metadata={"model": False})
    # what w is fitted on: "period", the period's rows alone; "pooled", every fit so far, each
    # weight's AUC gain and its variance summed over the periods (kept in the checkpoints'
    # metrics), so that `output_fusion_min_z` tests the evidence of all periods, not one's.
    # How w is fitted, not the model: not in the hash. Both defaults by the rule of
    # docs/experiment.md, "The fusion weight's pooled evidence"
    output_fusion_evidence: str = field(default="pooled", metadata={"model": False})
    # before each period's training, one pass over its rows that trains the adapters alone
    # (the target tower frozen: its tables, dense layers and batch-norm statistics): the
    # adapters fit rows the target has not fitted yet, where the source's knowledge shows
    adapter_prequential_pass: bool = field(default=False, metadata={"model": False})
    # how the adapters train (not part of the model: a checkpoint loads under other settings)
    adapter_optimizer: OptimizerConfig = field(default_factory=_adapter_optimizer,
                                               metadata={"model": False})

    def validate(self, key: str) -> None:
        _check(0 < self.adapter_init_scale < 1, f"{key}.adapter_init_scale", "must be in (0, 1)")
        _check(self.source_lag in (0, 1), f"{key}.source_lag", "must be 0 or 1")
        _check(self.output_fusion_min_z >= 0, f"{key}.output_fusion_min_z", "must be >= 0")
        _check(self.output_fusion_evidence in ("period", "pooled"),
               f"{key}.output_fusion_evidence", "must be 'period' or 'pooled'")
        self.adapter_optimizer.validate(f"{key}.adapter_optimizer")


ShardingType = Literal["table_wise", "row_wise", "column_wise", "table_row_wise"]
# where a table's rows live: "fused" all in device memory; "fused_uvm" in host memory reached
# from the GPU; "fused_uvm_caching" in host memory with a cache of the hot rows on the GPU
ComputeKernel = Literal["fused", "fused_uvm", "fused_uvm_caching"]


@dataclass
class ShardingConfig:
    """How `sharding/` places the tables over the ranks: one sharding type for every table,
    or per table in `tables`. Not part of the model: a checkpoint saved under one plan loads
    under another (torch.distributed.checkpoint reshards), except that a trainable table's
    row-wise AdaGrad state cannot move between column-wise and the other types."""

    sharding_type: ShardingType = "table_wise"
    tables: dict[str, ShardingType] = field(default_factory=dict)
    compute_kernel: ComputeKernel = "fused"  # the uvm kernels are CUDA's
    kernels: dict[str, ComputeKernel] = field(default_factory=dict)
    cache_load_factor: float = 0.2  # fused_uvm_caching: the share of rows cached on the GPU
    # CTNet's frozen source tables: fp16 storage halves them (lookups still return fp32)
    source_table_dtype: Literal["fp32", "fp16"] = "fp32"

    def type_of(self, table: str, managed: bool = False) -> str:
        """A managed-id table defaults to row_wise, the only type TorchRec shards it with."""
        return self.tables.get(table, "row_wise" if managed else self.sharding_type)

    def kernel_of(self, table: str) -> str:
        return self.kernels.get(table, self.compute_kernel)

    def validate(self, key: str) -> None:  # table names: checked against the features above
        _check(0 < self.cache_load_factor <= 1, f"{key}.cache_load_factor", "must be in (0, 1]")


@dataclass
class TableOptimizerConfig:
    """The tables' optimiser: fbgemm's fused row-wise AdaGrad (TorchRec), applied inside the
    backward pass, its state sharded with the table. One sum of squared gradients per row,
    starting at 0: a row's first update has length lr * sqrt(embedding_dim) whatever its
    gradient's size (tested in tests/test_optim.py)."""

    lr: float = 0.01
    # the lr ramps linearly from lr / warmup_steps at the first step to lr after this many
    # (TorchRec's WarmupOptimizer around the fused optimiser; its step count is checkpointed)
    warmup_steps: int = 0

    def validate(self, key: str) -> None:
        _check(0 < self.lr < float("inf"), f"{key}.lr", "must be a finite number > 0")
        _check(self.warmup_steps >= 0, f"{key}.warmup_steps", "must be >= 0")


@dataclass
class TrainConfig:
    """Optimisation and placement. The paper: AdaGrad, lr 0.01, for tables (`[train.tables]`)
    and dense layers (`[train.dense]`). `device` "cpu" runs on gloo, "cuda" on nccl: the code
    is the same."""

    device: Literal["cpu", "cuda"] = "cpu"
    seed: int = 0
    tables: TableOptimizerConfig = field(default_factory=TableOptimizerConfig)
    dense: OptimizerConfig = field(default_factory=OptimizerConfig)
    eval_batch_size: int = 4096
    # keep a run's newest K period checkpoints (0: all), never one a lineage in the same runs
    # root names (a CTNet run's source checkpoints); pruned periods keep their metrics lines
    keep_checkpoints: int = 0
    # also checkpoint inside a period every this many rows (all ranks together; 0: at period
    # ends only): a job killed mid-period resumes there (`--resume`) instead of at its start
    checkpoint_every_rows: int = 0
    # keep each evaluation's scores (RUN/scores/period=<t>.npy, the period's rows in file
    # order, as scored): paired tests between models on the same rows (`ctnet experiment`)
    save_scores: bool = False

    def validate(self, key: str) -> None:
        self.tables.validate(f"{key}.tables")
        self.dense.validate(f"{key}.dense")
        _check(self.eval_batch_size > 0, f"{key}.eval_batch_size", "must be > 0")
        _check(self.keep_checkpoints >= 0, f"{key}.keep_checkpoints", "must be >= 0 (0: all)")
        _check(self.checkpoint_every_rows >= 0, f"{key}.checkpoint_every_rows",
               "must be >= 0 (0: at period ends only)")
        _check(0 <= self.seed < 2**32, f"{key}.seed", "must be in [0, 2^32) (numpy's seeds)")


JointBaseline = Literal["MLP++", "Share Bottom", "PLE", "MiNet", "DDTCDR", "DASL"]


@dataclass
class ExperimentConfig:
    """`ctnet experiment`: the paper's comparison on one dataset. The source domain's tower
    trains continually on every period; each target domain's tower warms up on the periods
    before `deploy_period` (t0, standing for production models trained for years); then every
    compared model trains on periods t0 .. t0 + periods - 1, each evaluated on the next."""

    source_domain: str = "A"
    target_domains: list[str] = field(default_factory=lambda: ["B", "C"])
    deploy_period: int = 6
    periods: int = 4
    # the joint-learning baselines to run (each reads the source domain's window too)
    joint_baselines: list[JointBaseline] = field(
        default_factory=lambda: list(typing.get_args(JointBaseline)))
    # where a table the joint baselines' two tasks share starts: the target tower's rows (the
    # target task starts as the target model) or the source tower's (trained on more data)
    shared_table_rows: Literal["target", "source"] = "target"
    # the "ID embeddings" of Pre-train & Fine-tune (ID embeddings) and Dual Embedding, by
    # table name; empty: the tables of the user, item and category id features
    id_embedding_tables: list[str] = field(default_factory=list)
    # jobs run at a time, each in its own process with cores / parallel_jobs torch threads:
    # on a few cores two one-thread jobs train about 1.8x the rows of one two-thread job (the
    # data reader's threads stall a job's multi-threaded kernels); their wall times in the
    # cost table are then with the machine shared
    parallel_jobs: int = 1

    def validate(self, key: str) -> None:
        _check(self.parallel_jobs >= 1, f"{key}.parallel_jobs", "must be >= 1")
        _check(self.deploy_period >= 1, f"{key}.deploy_period",
               "must be >= 1 (the warm-up needs a period)")
        _check(self.periods >= 1, f"{key}.periods", "must be >= 1")
        _check(len(self.target_domains) > 0 and self.source_domain not in self.target_domains,
               f"{key}.target_domains", "needs at least one domain, not the source domain")
        _check(len(set(self.target_domains)) == len(self.target_domains),
               f"{key}.target_domains", "names a domain twice (each one's runs are one folder)")

    def id_tables(self, features: FeatureConfig) -> list[str]:
        """The tables of the baselines' "ID embeddings" (the paper's footnote 3: user, item,
        category and seller ids): `id_embedding_tables`, or else those of the user, item and
        category id features."""
        if self.id_embedding_tables:
            return list(self.id_embedding_tables)
        columns = {features.user_column, features.item_column, features.category_column}
        return sorted({f.table for f in features.id_features if f.column in columns})

    def last_period(self) -> int:
        """The last period trained; it is evaluated on the period after it."""
        return self.deploy_period + self.periods - 1


PipelineModel = Literal["ctnet", "base", "dual embedding"]


@dataclass
class PipelineConfig:
    """`ctnet pipeline`: the paper's production loop as one job. For each period that every
    domain has marked complete (`_SUCCESS`), in order: the source tower trains on it; each
    target's newest model is gated on the period's rows (which neither it nor the served
    model has trained on) and promoted or not; then the target's model trains on it. Before
    `deploy_period` a target's model is its own tower (its warm-up); CTNet (or `targets`'
    model) is deployed from the towers of the period before."""

    source_domain: str = "A"
    # each target domain and the model it serves
    targets: dict[str, PipelineModel] = field(default_factory=lambda: {"B": "ctnet"})
    deploy_period: int = 1
    # the gate: a candidate whose AUC on the gate's rows is below the served model's by more
    # than this stays out, as does one whose calibration (predicted / actual CTR) is outside
    # the bounds
    auc_margin: float = 0.002
    calibration_bounds: list[float] = field(default_factory=lambda: [0.5, 2.0])
    # bad periods: one whose row count or click rate is more than these factors away from
    # the median of the domain's last `recent_periods` good periods is quarantined
    recent_periods: int = 5
    rows_factor: float = 4.0
    ctr_factor: float = 2.0
    keep_checkpoints: int = 3  # per run (0: all); the served artifacts likewise
    poll_seconds: float = 60.0  # without --once: how often the data folder is looked at
    # targets trained side by side, each in its own process with cores / parallel_jobs torch
    # threads (the experiment's job runner)
    parallel_jobs: int = 1

    def validate(self, key: str) -> None:
        _check(len(self.targets) > 0 and self.source_domain not in self.targets,
               f"{key}.targets", "needs at least one domain, not the source domain")
        _check(self.deploy_period >= 1, f"{key}.deploy_period",
               "must be >= 1 (the targets' towers warm up on the periods before it)")
        _check(self.auc_margin >= 0, f"{key}.auc_margin", "must be >= 0")
        lo_hi = self.calibration_bounds
        _check(len(lo_hi) == 2 and 0 < lo_hi[0] <= 1 <= lo_hi[1], f"{key}.calibration_bounds",
               "must be [low, high] with 0 < low <= 1 <= high")
        _check(self.recent_periods >= 1, f"{key}.recent_periods", "must be >= 1")
        _check(self.rows_factor > 1 and self.ctr_factor > 1, f"{key}.rows_factor",
               "rows_factor and ctr_factor must be > 1")
        _check(self.keep_checkpoints >= 0, f"{key}.keep_checkpoints", "must be >= 0 (0: all)")
        _check(self.poll_seconds > 0, f"{key}.poll_seconds", "must be > 0")
        _check(self.parallel_jobs >= 1, f"{key}.parallel_jobs", "must be >= 1")


@dataclass
class Config:
    """A whole configuration file."""

    features: FeatureConfig
    model: TowerConfig = field(default_factory=TowerConfig)
    ctnet: CTNetConfig = field(default_factory=CTNetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)

    def validate(self, key: str = "") -> None:
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate(f.name)
        tables = {t.name for t in self.features.tables}
        for name in self.experiment.id_embedding_tables:
            _check(name in {f.table for f in self.features.id_features},
                   "experiment.id_embedding_tables",
                   f"{name!r} is not the table of an id feature (tables: {sorted(tables)})")
        for section in ("tables", "kernels"):
            for name in getattr(self.sharding, section):
                _check(name in tables, f"sharding.{section}.{name}",
                       f"no such table (tables: {sorted(tables)})")
        dims = {self.features.table(t).embedding_dim for t in self.features.sequence_tables()}
        _check(len(dims) <= 1, "features.tables",
               f"tables used by sequences must share one embedding_dim, got {sorted(dims)}")
        if self.features.sequences:
            token = 2 * dims.pop()
            _check(token % self.model.attention_heads == 0, "model.attention_heads",
                   f"must divide the behaviour token size {token} (item + category dims)")
        long_units = self.model.use_sim or self.model.use_eta
        _check(not self.ctnet.share_long_sequence_attention or long_units,
               "ctnet.share_long_sequence_attention", "the model has neither SIM nor ETA "
               "(model.use_sim, model.use_eta): no long-sequence attention to share")
        # without SIM and ETA every source_long_interest is "own": nothing to read
        reused = self.ctnet.source_long_interest != "own" and long_units
        _check(not (self.ctnet.share_long_sequence_attention and reused),
               "ctnet.source_long_interest", f"{self.ctnet.source_long_interest!r} with "
               "share_long_sequence_attention would have each tower read the other's "
               "long-sequence interests; share_long_sequence_attention = true needs "
               'source_long_interest = "own"')

    def _model_sections(self, *sections: str) -> dict[str, Any]:
        """Some sections as dicts, with their model settings only (`_model_settings`)."""
        return {s: _model_settings(s, dataclasses.asdict(getattr(self, s)),
                                   type(getattr(self, s))) for s in sections}

    def section_hash(self, *sections: str) -> str:
        """A stable hash of some sections, for checkpoint manifests and caches."""
        payload = self._model_sections(*sections)
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def section_differences(self, recorded: dict[str, Any], *sections: str) -> list[str]:
        """Each model setting of `sections` whose value differs from `recorded` (a config as
        a checkpoint records it), as "key: checkpoint X vs config Y"."""
        mine = _leaves(self._model_sections(*sections))
        theirs = _leaves({s: _model_settings(s, recorded.get(s, {}), type(getattr(self, s)))
                          for s in sections})
        return [f"{k}: checkpoint {theirs.get(k)} vs config {mine.get(k)}"
                for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]

    def setting_changes(self, recorded: dict[str, Any], *sections: str) -> list[str]:
        """Each setting of `sections` (any, not only the model's) whose value differs from
        `recorded`, as "key X -> Y". A setting `recorded` lacks (written before it existed) is
        compared as ADDED_LATER says it behaved, else left out."""
        mine = _leaves(json.loads(json.dumps({s: dataclasses.asdict(getattr(self, s))
                                              for s in sections})))
        theirs = _leaves({s: recorded.get(s, {}) for s in sections})
        theirs.update({f"{s}.{k}": v for (s, k), v in ADDED_LATER.items()
                       if s in sections and f"{s}.{k}" not in theirs})
        return [f"{k} {theirs[k]} -> {mine.get(k)}"
                for k in sorted(theirs) if mine.get(k) != theirs[k]]


def dotted_values(cfg: Config) -> dict[str, Any]:
    """Every setting of `cfg` by its dotted key, as `--set` names it ("train.dense.lr")."""
    return _leaves(dataclasses.asdict(cfg))


def _leaves(d: Any, key: str = "") -> dict[str, Any]:
    """A nested dict's values by dotted key ("train.dense.lr")."""
    if isinstance(d, dict):
        return {k: v for name, sub in d.items()
                for k, v in _leaves(sub, f"{key}.{name}" if key else name).items()}
    return {key: d}


_NOT_MODEL: dict[type, set[str]] = {
    cls: {f.name for f in dataclasses.fields(cls) if not f.metadata.get("model", True)}
    for cls in (CTNetConfig,)}

# Settings added after checkpoints recording their section were written: (section, key) ->
# the value that behaves as before the key existed, so a run resumes as it was trained. A
# model setting is left out of the config hash at that value, so a checkpoint of an older
# version still loads (and its hash is unchanged).
ADDED_LATER: dict[tuple[str, str], Any] = {("ctnet", "output_fusion"): False,
                                           ("ctnet", "adapter_gate"): False,
                                           ("ctnet", "adapter_input_norm"): False,
                                           ("ctnet", "output_fusion_min_z"): 0.0,
                                           ("ctnet", "output_fusion_evidence"): "period",
                                           ("ctnet", "source_long_interest"): "own"}
_ABSENT = object()


def _model_settings(section: str, values: dict[str, Any], cls: type) -> dict[str, Any]:
    """A section's settings that are part of the model: not how it trains (`_NOT_MODEL`), and
    not a setting added later at the value that behaves as before it existed (`ADDED_LATER`),
    so that a config and an older checkpoint's record of it compare equal."""
    return {k: v for k, v in values.items() if k not in _NOT_MODEL.get(cls, ())
            and ADDED_LATER.get((section, k), _ABSENT) != v}

# Keys that moved, and where to: refused with the new name rather than "unknown key".
RENAMED = {"train.sparse_lr": "train.tables.lr", "train.dense_lr": "train.dense.lr"}


# ---------------------------------------------------------------------------------------------
# The generic TOML -> dataclass walk.
# ---------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _build(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        _check(isinstance(value, dict), key, f"expected a table, got {type(value).__name__}")
        return _build_dataclass(tp, value, key)
    if origin is list:
        _check(isinstance(value, list), key, f"expected a list, got {type(value).__name__}")
        return [_build(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _check(isinstance(value, dict), key, f"expected a table, got {type(value).__name__}")
        return {k: _build(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if origin is Literal:
        _check(value in args, key, f"must be one of {list(args)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        for a in args:
            try:
                return _build(a, value, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        _check(value is None, key, "expected nothing")
        return None
    if tp is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        _check(ok, key, f"expected a number, got {value!r}")
        return float(value)
    if tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        _check(ok, key, f"expected an integer, got {value!r}")
        return value
    _check(isinstance(value, tp), key, f"expected {_type_name(tp)}, got {value!r}")
    return value


def _build_dataclass(cls: type, raw: dict[str, Any], key: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    where = f"{key}." if key else ""
    for name in unknown:
        _check(f"{where}{name}" not in RENAMED, f"{where}{name}",
               f"renamed: set {RENAMED.get(f'{where}{name}')} instead")
    _check(not unknown, f"{where}{unknown[0]}" if unknown else key,
           f"unknown key (allowed: {sorted(fields)})")
    kwargs = {}
    for name, f in fields.items():
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{where}{name}: required key is missing")
        elif cls is SynthConfig and name == "domains":
            kwargs[name] = _build_domains(raw[name], f"{where}{name}")
        else:
            kwargs[name] = _build(hints[name], raw[name], f"{where}{name}")
    return cls(**kwargs)


def _build_domains(raw: Any, key: str) -> dict[str, DomainWorldConfig]:
    """Domain tables override the built-in A/B/C defaults key by key (a new domain starts from
    B's), so a config may set only what it changes; the source domain A is always present."""
    _check(isinstance(raw, dict), key, "expected a table")
    defaults = _default_domains()
    out = {"A": defaults["A"]}
    for name, d in raw.items():
        _check(isinstance(d, dict), f"{key}.{name}", "expected a table")
        base = dataclasses.asdict(defaults.get(name, defaults["B"]))
        out[name] = _build(DomainWorldConfig, base | d, f"{key}.{name}")
    return out


def recorded_config(raw: dict[str, Any]) -> Config:
    """A config a checkpoint recorded, written by this or an earlier version: the keys that
    were renamed since are carried over (an earlier run's single dense lr also trained its
    adapters, from accumulator 0), so a run resumes as it was trained. The synthetic world's
    per-domain `specific_weight`, replaced by `synth.domain_gap`, is dropped (the world is
    data, not part of the model). A model setting added since (`ADDED_LATER`) takes the value
    that behaves as before it existed, whatever today's default."""
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for (section, key), before in ADDED_LATER.items():
        if isinstance(raw.get(section), dict):
            raw[section].setdefault(key, before)
    synth = raw.get("synth", {})
    if "domains" in synth:
        synth["domains"] = {name: {k: v for k, v in d.items() if k != "specific_weight"}
                            for name, d in synth["domains"].items()}
    train = raw.get("train", {})
    if "sparse_lr" in train:
        train["tables"] = {"lr": train.pop("sparse_lr")}
    if "dense_lr" in train:
        lr = train.pop("dense_lr")
        train["dense"] = {"optimizer": "adagrad", "lr": lr}
        raw.setdefault("ctnet", {}).setdefault(
            "adapter_optimizer", {"optimizer": "adagrad", "lr": lr, "initial_accumulator": 0.0})
    return config_from_dict(raw)


def build_section(cls: type[T], raw: dict[str, Any]) -> T:
    """A dataclass of another file (e.g. `data from-events`' mapping) from its TOML tables,
    with the checks and messages of a config's sections."""
    built: T = _build_dataclass(cls, raw, "")
    return built


def config_from_dict(raw: dict[str, Any]) -> Config:
    cfg = _build_dataclass(Config, raw, "")
    cfg.validate()
    return cfg


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Load and validate a TOML config, with `overrides` ("section.key=value", the value as
    TOML, e.g. `train.seed=3`, `ctnet.output_fusion=true`; a bare word is a string) set over
    the file's keys; every problem is reported with the file and key."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); TOML files are UTF-8") \
            from None
    for item in overrides:
        set_key(raw, item)
    try:
        return config_from_dict(raw)
    except ConfigError as e:
        given = f" with --set {' '.join(overrides)}" if overrides else ""
        raise ConfigError(f"{path}{given}: {e}") from None


def set_key(raw: dict[str, Any], item: str) -> None:
    """One "section.key=value" override into a config's raw TOML tables (validated with the
    rest by `config_from_dict`). Entries of a [[...]] list are not addressable."""
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. train.seed=3")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # a bare word: a string
    table = raw
    for i, part in enumerate(parts[:-1]):
        table = table.setdefault(part, {})
        if not isinstance(table, dict):
            raise ConfigError(f"--set {item!r}: {'.'.join(parts[:i + 1])} is not a table")
    table[parts[-1]] = value
