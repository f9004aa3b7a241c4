"""The settings of one tokenization run, typed, each default stated once: ``TokenizeOptions`` (what to write and
how) and ``Resources`` (where it runs).

``gq tokenize`` (jobs/tokenize.py) takes its argparse defaults from these fields and builds both from the command
line; ``gq_pipeline.tokenize`` builds them from its keywords (or takes them whole), so the command and the Python
API cannot drift apart. Each class checks its values when built, before a model is loaded or a file is read: a bad
choice or a non-positive size fails with a ``ValueError`` naming it. The help text stays in the CLI.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from gq_pipeline.preprocess import CROP_MODES, DEFAULT_MAX_PIXELS, check_policy

__all__ = ["TokenizeOptions", "Resources", "FORMATS", "PRECISIONS", "PLACEMENTS", "defaults", "split_keywords"]

FORMATS = {"parquet": ("parquet",), "webdataset": ("webdataset",), "both": ("parquet", "webdataset")}
PRECISIONS = ("fp32", "bf16")
PLACEMENTS = ("auto", "driver", "actors")


def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)  # normalizing a frozen dataclass's field in __post_init__


@dataclass(frozen=True)
class TokenizeOptions:
    """What a run reads, how it preprocesses and tokenizes, what it writes, and how it reports (``gq tokenize
    --help`` says what each one does). Sequences are stored as tuples."""

    # output
    format: str = "parquet"
    latents: bool = False
    # preprocessing and the model call
    image_size: int = 256
    crop: str = "center"
    preprocess: str = "gq"
    batch_size: int = 64
    max_pixels: int = DEFAULT_MAX_PIXELS
    precision: str = "fp32"
    # the model file (besides --model)
    config: str | None = None
    preset: str | None = None
    trust_checkpoint: bool = False
    # inputs and planning
    unit_size: int = 1000
    image_column: str | None = None
    extensions: tuple[str, ...] = ()
    allow_external_refs: tuple[str, ...] = ()
    input_list: str | None = None
    input_list_column: str | None = None
    relist: bool = False
    allow_empty: bool = False
    storage_options: Mapping[str, Any] | None = None
    # faults and the output's lease
    max_failed_units: str | int | float | None = None
    max_attempts: int = 3
    force_lease: bool = False
    # reporting
    progress: bool = True
    verbose: bool = False

    def __post_init__(self):
        from gq_model.storage import check_storage_options
        from gq_pipeline.scheduler import FailureBudget

        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {sorted(FORMATS)}, got {self.format!r}")
        if self.crop not in CROP_MODES:
            raise ValueError(f"crop must be one of {CROP_MODES}, got {self.crop!r}")
        check_policy(self.preprocess, self.crop)  # "gq" or "reference" (gq_pipeline/preprocess.py)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.batch_size < 1 or self.unit_size < 1 or self.max_pixels < 1:
            raise ValueError("batch_size, unit_size and max_pixels must be positive")
        FailureBudget(self.max_failed_units, 0)  # a malformed count or fraction fails now, not after planning
        _set(self, "storage_options", check_storage_options(self.storage_options, "storage_options"))
        _set(self, "extensions", tuple(self.extensions or ()))
        _set(self, "allow_external_refs", tuple(self.allow_external_refs or ()))

    @property
    def formats(self) -> tuple[str, ...]:
        """The shard formats ``format`` names, in a record's order."""
        return FORMATS[self.format]


@dataclass(frozen=True)
class Resources:
    """Where units are processed and with how much (the policy that turns these into a placement for the cluster
    at hand is ``gq_pipeline.placement``). ``None`` means "from what the cluster has"."""

    model_placement: str = "auto"
    workers: int | None = None
    min_workers: int = 1
    worker_timeout_s: float = 900.0
    gpus_per_worker: float | None = None
    cpus_per_worker: float | None = None
    decode_threads: int | None = None
    ray_address: str | None = None
    num_cpus: int | None = None
    object_store_memory: int | None = None

    def __post_init__(self):
        if self.model_placement not in PLACEMENTS:
            raise ValueError(f"model placement must be one of {PLACEMENTS}, got {self.model_placement!r}")


def defaults(cls: type) -> dict[str, Any]:
    """``{field: default}`` of ``TokenizeOptions`` or ``Resources``: what the CLI's argparse defaults are."""
    return {f.name: f.default for f in dataclasses.fields(cls)}


def split_keywords(keywords: Mapping[str, Any], options: TokenizeOptions | None = None,
                   resources: Resources | None = None) -> tuple[TokenizeOptions, Resources]:
    """``tokenize``'s keywords as ``(TokenizeOptions, Resources)``: each keyword replaces that field of ``options`` /
    ``resources`` (or of the defaults); an unknown one is a ``TypeError``, as for any Python function."""
    names = {f.name for f in dataclasses.fields(TokenizeOptions)}
    res_names = {f.name for f in dataclasses.fields(Resources)}
    unknown = sorted(set(keywords) - names - res_names)
    if unknown:
        raise TypeError(f"tokenize() got an unexpected keyword argument {unknown[0]!r}")
    for given, cls in ((options, TokenizeOptions), (resources, Resources)):
        if given is not None and not isinstance(given, cls):
            raise TypeError(f"expected a {cls.__name__}, got {type(given).__name__}")
    opt_kw = {k: v for k, v in keywords.items() if k in names}
    res_kw = {k: v for k, v in keywords.items() if k in res_names}
    opts = dataclasses.replace(options, **opt_kw) if options is not None else TokenizeOptions(**opt_kw)
    res = dataclasses.replace(resources, **res_kw) if resources is not None else Resources(**res_kw)
    return opts, res

