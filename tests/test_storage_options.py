"""Storage options given once for a run and picked per URL (gq_model.storage)."""
from __future__ import annotations

import pytest

from gq_model.storage import options_for, url_to_fs

S3 = {"endpoint_url": "http://127.0.0.1:9000", "key": "k", "secret": "s"}
GS = {"endpoint_url": "http://127.0.0.1:4443", "token": "anon"}


def test_a_flat_dict_serves_every_remote_url_and_never_a_local_path(tmp_path):
    assert options_for("s3://b/k", S3) == S3
    assert options_for("https://host/x.tar", S3) == S3
    assert options_for(str(tmp_path), S3) == {} and options_for(f"file://{tmp_path}", S3) == {}
    assert options_for("s3://b/k", None) == {}
    fs, path = url_to_fs(str(tmp_path), S3)  # a local fs would reject S3 keywords
    assert path == str(tmp_path)


@pytest.mark.parametrize("url,expected", [
    ("s3://b/k", S3), ("s3a://b/k", S3), ("gs://b/k", GS), ("gcs://b/k", GS), ("https://h/x", {}), ("/tmp/x", {})])
def test_per_protocol_entries_are_picked_by_protocol_and_alias(url, expected):
    assert options_for(url, {"s3": S3, "gcs": GS}) == expected


def test_the_urls_own_spelling_wins_over_an_alias():
    assert options_for("gs://b", {"gs": {"token": "a"}, "gcs": {"token": "b"}}) == {"token": "a"}
    assert options_for("gcs://b", {"gs": {"token": "a"}, "gcs": {"token": "b"}}) == {"token": "b"}


def test_a_flat_dict_with_a_dict_value_is_still_flat():
    flat = {"client_kwargs": {"region_name": "us-east-1"}, "anon": True}
    assert options_for("s3://b", flat) == flat
