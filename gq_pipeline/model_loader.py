"""``--model`` resolution for the pipeline: a re-export of :func:`gq_model.loading.load_model`.

The model-spec rules (bundle, built-in name, reference ``.ckpt``, DeepSpeed checkpoint, ``hf://``, ``official:``) live
in :mod:`gq_model.loading`, shared with ``gq eval``, ``gq decode`` and the Python API. The driver loads the model
once; actors get its weights through the object store (see ``stages.model_payload``).
"""
from __future__ import annotations

from gq_model.loading import load_model

__all__ = ["load_model"]
