"""GQ dataset tokenization: a Ray Data job that turns image folders, WebDataset tars and Parquet files into token
shards (docs/token-format.md), plus the preprocessing it uses.

``tokenize`` (its settings: ``TokenizeOptions`` and ``Resources``, gq_pipeline.options) and ``preprocess_image``
are imported lazily so that ``import gq_pipeline`` stays cheap (no Ray import);
readers (``TokenDataset``) live in ``gq_pipeline.dataset``; ``GQTokenizer`` (a batch stage for Ray Data, HF
``datasets`` and WebDataset) and ``GQShardSink`` (a Ray Datasink) in ``gq_pipeline.plugin`` / ``gq_pipeline.sink``
(docs/plugin.md).
"""
from __future__ import annotations

import importlib

__all__ = ["tokenize", "TokenizeOptions", "Resources", "preprocess_image", "preprocess_pil", "preprocess_array", "SampleError", "ERROR_KINDS",
           "TokenDataset", "TokenLoader", "TokenMixture", "GQTokenizer", "GQShardSink"]

_LAZY = {"tokenize": ("gq_pipeline.job", "tokenize"),
         "TokenizeOptions": ("gq_pipeline.options", "TokenizeOptions"),
         "Resources": ("gq_pipeline.options", "Resources"),
         "preprocess_image": ("gq_pipeline.preprocess", "preprocess_image"),
         "preprocess_pil": ("gq_pipeline.preprocess", "preprocess_pil"),
         "preprocess_array": ("gq_pipeline.preprocess", "preprocess_array"),
         "GQTokenizer": ("gq_pipeline.plugin", "GQTokenizer"),
         "GQShardSink": ("gq_pipeline.sink", "GQShardSink"),
         "SampleError": ("gq_pipeline.records", "SampleError"),
         "ERROR_KINDS": ("gq_pipeline.records", "ERROR_KINDS"),
         "TokenDataset": ("gq_pipeline.dataset", "TokenDataset"),
         "TokenLoader": ("gq_pipeline.dataset", "TokenLoader"),
         "TokenMixture": ("gq_pipeline.mixture", "TokenMixture")}


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'gq_pipeline' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
