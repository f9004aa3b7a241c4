"""gq as a WebDataset pipeline stage: ``wds.WebDataset(url).compose(GQTokenizer(...).wds_stage(n))``.

    python examples/webdataset_stage.py

Writes a small tar of JPEGs (with captions), then streams it through ``wds_stage``, which runs the built-in ``demo``
model on batches of samples and yields each sample with ``tokens``, ``token_shape`` and ``gq_error`` added.
"""
from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    import webdataset as wds

    from _images import sample_jpegs
    from gq_pipeline import GQTokenizer

    work = tempfile.mkdtemp(prefix="gq-wds-example-")
    url = os.path.join(work, "shard-000000.tar")
    with wds.TarWriter(url) as sink:
        for i, data in enumerate(sample_jpegs(6)):
            sink.write({"__key__": f"sample{i:04d}", "jpg": data, "txt": f"picture {i}"})
        sink.write({"__key__": "broken", "jpg": b"not a jpeg", "txt": "a corrupt file"})
    tok = GQTokenizer("demo", image_size=64)
    pipeline = wds.WebDataset(url, shardshuffle=False).compose(tok.wds_stage(4))
    for sample in pipeline:
        tokens = None if sample["tokens"] is None else sample["tokens"].reshape(sample["token_shape"]).shape
        print(f"  {sample['__key__']} ({sample['txt'].decode()}): tokens {tokens}, error {sample['gq_error']}")


if __name__ == "__main__":
    main()
