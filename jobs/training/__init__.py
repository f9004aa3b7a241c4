"""GQ autoencoder training: config, data, losses wiring, engines, checkpoints, monitoring and the loop.

Entry points: ``gq train`` (jobs/train.py), :func:`jobs.training.loop.train` for Python callers, and
:func:`jobs.training.checkpoint.load_model_from_zero_checkpoint` to get a GQModel back from a checkpoint.
"""
