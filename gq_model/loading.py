"""Model specs: the one function every entry point resolves ``--model`` with.

``gq tokenize``, ``gq eval``, ``gq decode``, the Python pipeline API and ``GQModel.from_pretrained`` all accept the same
forms, resolved here and nowhere else:

* a ``GQModel`` instance (Python API);
* ``official:NAME`` or ``hf://owner/repo[@revision]/file.ckpt``: a reference checkpoint on the Hugging Face Hub
  (:mod:`gq_model.hub`; preset inferred from the file name unless ``preset``/``config`` say otherwise);
* ``*.ckpt`` (local path or fsspec URL): the reference's Lightning checkpoint, with ``config`` (its YAML) or ``preset``;
* a directory or URL with ``config.json``: a GQ bundle (``save_pretrained``), its ``weights_sha256`` required;
* a local directory with a DeepSpeed ``latest`` file (run dir, ``checkpoints`` dir) or a tag dir: a training
  checkpoint of any ZeRO stage (:mod:`gq_model.zero_checkpoint`);
* a built-in model name such as ``demo``.

Every torch pickle among these is read by :func:`gq_model.safe_load.load_torch_file`, ``weights_only`` unless
``trust_checkpoint`` is set; Hub files are never trusted. Bundles are safetensors, no pickle at all.

This is also the one place a ``GQModel`` is assembled from a file: the readers (:mod:`gq_model.bundle`,
:mod:`gq_model.reference_checkpoint`, :mod:`gq_model.zero_checkpoint`, :mod:`gq_model.hub`) return
``(config, state_dict)`` and never import the model, and :meth:`GQModel.from_parts` checks and loads the weights, so
imports run one way: this module imports the model and the readers, none of them imports it back
(``GQModel.from_pretrained`` is the model's door to here; ``tests/test_model_layering.py`` checks the graph).
"""
from __future__ import annotations

import os
from typing import Any

__all__ = ["load_model", "describe_spec", "load_pretrained", "load_bundle", "load_reference_checkpoint",
           "load_model_from_zero_checkpoint", "load_hub_model"]


def describe_spec(spec: Any) -> str:
    """Which form ``spec`` is: ``model``, ``hub``, ``reference``, ``bundle``, ``deepspeed`` or ``builtin``."""
    from gq_model.hub import is_hub_spec

    if not isinstance(spec, (str, os.PathLike)):
        return "model"
    spec = os.fspath(spec)
    if is_hub_spec(spec):
        return "hub"
    if spec.endswith(".ckpt"):
        return "reference"
    if "://" not in spec and "/" not in spec and not os.path.exists(spec):
        return "builtin"
    if "://" not in spec or spec.startswith("file://"):
        from gq_model.zero_checkpoint import is_deepspeed_checkpoint

        local = spec[len("file://"):] if spec.startswith("file://") else spec
        if os.path.isdir(local) and not os.path.isfile(os.path.join(local, "config.json")) \
                and is_deepspeed_checkpoint(local):
            return "deepspeed"
    return "bundle"


def load_model(spec: Any, *, config: str | None = None, preset: str | None = None, trust_checkpoint: bool = False,
               storage_options: dict | None = None, map_location: Any = "cpu"):
    """A GQModel in eval mode from any model spec (see the module docstring).

    ``config``/``preset`` pick the architecture of a reference checkpoint (required for a local ``.ckpt``, an
    override for Hub files); they are refused for forms that carry their own architecture. ``trust_checkpoint``
    allows full unpickling of local ``.ckpt`` and DeepSpeed files (never of Hub downloads). ``storage_options`` go to
    fsspec for remote bundles and ``.ckpt`` URLs.
    """
    from gq_model.model import GQModel

    if isinstance(spec, GQModel):
        return spec.eval()
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"--model must be a path, URL, model name or GQModel, not {type(spec).__name__}")
    spec = os.fspath(spec)
    if spec.startswith("memory:"):
        raise ValueError("--model: memory:// is not supported (Ray workers cannot see it)")
    kind = describe_spec(spec)
    if config is not None and preset is not None:
        raise ValueError("give either a reference YAML (--config) or a preset (--preset), not both")
    if kind not in ("hub", "reference") and (config is not None or preset is not None):
        raise ValueError(f"--model {spec} is a {kind} model, which records its own architecture: --config/--preset "
                         f"only apply to reference .ckpt files and hf:// / official: models")
    if kind == "hub":
        if trust_checkpoint:
            raise ValueError(f"--trust-checkpoint does not apply to {spec}: files from the Hub are always read "
                             f"weights_only")
        model = load_hub_model(spec, config=config, preset=preset)
    elif kind == "reference":
        if config is None and preset is None:
            from gq_model.hub import infer_preset

            hint = infer_preset(spec)
            raise ValueError(f"{spec} is a reference .ckpt: pass its YAML with --config or a built-in --preset "
                             f"(e.g. --preset {hint or 'sd3unet_gq_0.25'})")
        model = load_reference_checkpoint(spec, config, preset=preset, trust_checkpoint=trust_checkpoint,
                                          storage_options=storage_options)
    elif kind == "deepspeed":
        local = spec[len("file://"):] if spec.startswith("file://") else spec
        model = load_model_from_zero_checkpoint(local, trust_checkpoint=trust_checkpoint)
    else:  # bundle or built-in name
        if kind == "bundle":
            _check_bundle_dir(spec, storage_options)
        model = load_bundle(spec, storage_options=storage_options)
    return model.to(map_location).eval()


def _check_bundle_dir(spec: str, storage_options: dict | None) -> None:
    """Name what a directory is missing when it is neither a bundle nor a training checkpoint."""
    from gq_model.storage import url_to_fs

    fs, path = url_to_fs(spec, storage_options)
    path = path.rstrip("/")
    if fs.isdir(path):
        if not fs.exists(f"{path}/config.json"):
            remote = "://" in spec and not spec.startswith("file://")
            raise ValueError(f"{spec} is a directory but neither a GQ bundle (no config.json) nor a DeepSpeed "
                             f"checkpoint (no 'latest' file)" + (" (DeepSpeed checkpoints are read from local "
                                                                  "paths only; export it with gq export)"
                                                                  if remote and fs.exists(f"{path}/latest") else ""))
        return
    if not fs.exists(path):
        raise FileNotFoundError(f"--model {spec}: no such file, directory or built-in model")
    raise ValueError(f"--model {spec}: unrecognised file; expected a .ckpt, a bundle directory, a DeepSpeed checkpoint "
                     f"directory, hf://owner/repo/file.ckpt or official:NAME")


# ------------------------------------------------------------------------------------------------ assembling
def load_pretrained(url: str, map_location: Any = "cpu", *, storage_options: dict | None = None,
                    preset: str | None = None, config: str | None = None, trust_unhashed: bool = False):
    """:meth:`GQModel.from_pretrained`: a bundle, a built-in name or a Hub checkpoint (the forms it has always
    taken; :func:`load_model` takes every form)."""
    from gq_model.hub import is_hub_spec

    if is_hub_spec(str(url)):
        return load_hub_model(str(url), config=config, preset=preset).to(map_location).eval()
    if preset is not None or config is not None:
        raise ValueError(f"{url}: preset/config only apply to reference checkpoints (hf://, official:); a bundle "
                         f"records its own architecture")
    return load_bundle(url, map_location=map_location, storage_options=storage_options, trust_unhashed=trust_unhashed)


def load_bundle(url: str, map_location: Any = "cpu", storage_options: dict | None = None, *,
                trust_unhashed: bool = False):
    """A GQModel from a bundle directory or URL, weights and codebook verified (see :func:`gq_model.bundle.read_bundle`)."""
    from gq_model.bundle import read_bundle, verify_codebook
    from gq_model.model import GQModel

    parts = read_bundle(url, storage_options, trust_unhashed=trust_unhashed)
    model = GQModel(parts.config)
    verify_codebook(url, parts.meta, parts.codebook, model.config, model.fingerprint)
    model.load_checked(parts.state_dict, what=f"{parts.weights_path} does not match its config")
    return model.to(map_location).eval()


def load_reference_checkpoint(checkpoint: str, config: str | None = None, *, preset: str | None = None,
                              trust_checkpoint: bool = False, storage_options: dict | None = None):
    """A GQModel from the reference YAML (or a preset) and the checkpoint's autoencoder, loaded strictly; the model's
    ``load_report`` lists the trainer keys ignored and any unexpected ones."""
    from gq_model.model import GQModel
    from gq_model.reference_checkpoint import read_reference_checkpoint

    parts = read_reference_checkpoint(checkpoint, config, preset=preset, trust_checkpoint=trust_checkpoint,
                                      storage_options=storage_options)
    model = GQModel.from_parts(parts.config, parts.state_dict, got_name="checkpoint", expected_name="config",
                               what=f"{checkpoint} does not fit the {parts.config.arch} config {parts.source}",
                               hint="Is this a checkpoint for another architecture or bit rate?")
    model.load_report = parts.report
    return model


def load_model_from_zero_checkpoint(ckpt_dir: str, tag: str | None = None, *, trust_checkpoint: bool = False):
    """A GQModel (eval mode, fp32, CPU) from a training checkpoint of any ZeRO stage
    (see :func:`gq_model.zero_checkpoint.read_zero_checkpoint`)."""
    from gq_model.model import GQModel
    from gq_model.zero_checkpoint import GQ_CONFIG_NAME, read_zero_checkpoint

    config, weights, where = read_zero_checkpoint(ckpt_dir, tag, trust_checkpoint=trust_checkpoint)
    return GQModel.from_parts(config, weights, what=f"checkpoint {where} does not match its {GQ_CONFIG_NAME}")


def load_hub_model(spec: str, *, config: str | None = None, preset: str | None = None, cache_bundle: bool = True):
    """A GQModel from ``hf://...`` or ``official:NAME`` (see :mod:`gq_model.hub` for each step)."""
    from gq_model import hub

    found = hub.fetch_hub_checkpoint(spec, config=config, preset=preset)
    if cache_bundle and os.path.isfile(os.path.join(found.bundle_dir, "config.json")):
        try:
            return load_bundle(found.bundle_dir)  # checks its own weights_sha256
        except (ValueError, OSError) as e:
            hub.discard_cached_bundle(spec, found.bundle_dir, e)
    hub.verify_cached_file(found.hub_file, found.path)
    model = load_reference_checkpoint(found.path, found.config, preset=found.preset, trust_checkpoint=False)
    if cache_bundle:
        hub.save_cached_bundle(model, found.bundle_dir, spec, found.hub_file)
    return model
