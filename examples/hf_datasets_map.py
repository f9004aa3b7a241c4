"""gq inside a Hugging Face ``datasets`` pipeline: ``Dataset.map(GQTokenizer(...), batched=True)``.

    python examples/hf_datasets_map.py

Builds a small image dataset (an ``Image()`` column), tokenizes it with the built-in ``demo`` model in two worker
processes (``num_proc=2``: the model is loaded on CPU and the device is chosen in each worker), saves it with
``save_to_disk`` and ``to_parquet``, and reads the tokens back.
"""
from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    import datasets
    import numpy as np
    import pyarrow.parquet as pq

    from _images import sample_jpegs
    from gq_pipeline import GQTokenizer

    work = tempfile.mkdtemp(prefix="gq-hf-example-")
    data = sample_jpegs(6) + [b"not an image"]
    ds = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in data],
                                     "caption": [f"picture {i}" for i in range(len(data))]},
                                    features=datasets.Features({"image": datasets.Image(decode=False),
                                                                "caption": datasets.Value("string")}))
    tok = GQTokenizer("demo", image_size=64, batch_size=4)
    out = ds.map(tok, batched=True, batch_size=4, num_proc=2)
    print(out.features)
    for row in out:
        shape = None if row["tokens"] is None else len(row["tokens"])
        print(f"  {row['caption']}: {shape} tokens, shape {row['token_shape']}, error {row['gq_error']}")
    out.save_to_disk(os.path.join(work, "saved"))
    back = datasets.load_from_disk(os.path.join(work, "saved"))
    assert np.array_equal(back[0]["tokens"], out[0]["tokens"])
    out.to_parquet(os.path.join(work, "tokens.parquet"))
    table = pq.read_table(os.path.join(work, "tokens.parquet"))
    print(f"{work}: saved; Parquet tokens column is {table.schema.field('tokens').type}")


if __name__ == "__main__":
    main()
