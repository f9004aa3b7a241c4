"""gq as one stage of a Ray Data pipeline, then written as gq token shards with GQShardSink.

    python examples/ray_data_stage.py [OUTPUT_DIR]

Reads a folder of images with ``read_binary_files``, keeps the JPEGs, tokenizes them with an actor pool of
``GQTokenizer`` (the built-in ``demo`` model; on a GPU cluster add ``num_gpus=1``), writes Parquet + WebDataset token
shards, and reads them back with ``TokenDataset``. One corrupt file shows the error value and error record.
"""
from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def main() -> None:
    import ray
    from ray.data import ActorPoolStrategy

    from _images import sample_jpegs
    from gq_pipeline import GQShardSink, GQTokenizer, TokenDataset

    work = tempfile.mkdtemp(prefix="gq-ray-example-")
    images = os.path.join(work, "images")
    os.makedirs(images)
    for i, data in enumerate(sample_jpegs(6)):
        with open(os.path.join(images, f"img{i}.jpg"), "wb") as f:
            f.write(data)
    with open(os.path.join(images, "broken.jpg"), "wb") as f:
        f.write(b"not a jpeg")
    with open(os.path.join(images, "README.txt"), "w") as f:
        f.write("filtered out")
    output = sys.argv[1] if len(sys.argv) > 1 else os.path.join(work, "tokens")

    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
    settings = {"model": "demo", "image_size": 64, "image_column": "bytes"}
    ds = (ray.data.read_binary_files(images, include_paths=True)
          .filter(lambda row: row["path"].endswith(".jpg"))
          .map_batches(GQTokenizer, fn_constructor_kwargs=settings, compute=ActorPoolStrategy(size=1),
                       batch_size=8, batch_format="pyarrow", num_cpus=1))
    sink = GQShardSink(output, GQTokenizer(**settings), format="both")
    ds.write_datasink(sink)
    m = sink.result
    print(f"{output}: {m['tokenized']} tokenized + {m['errors']} errors = {m['inputs']} inputs "
          f"({m['errors_by_kind']})")
    for sample in TokenDataset(output, shuffle=False):
        print(f"  {os.path.basename(sample['source'])}: tokens {tuple(sample['tokens'].shape)}")
    ray.shutdown()


if __name__ == "__main__":
    main()
