"""The photo set of the built-in model (jobs/demo_photos.py): pins, the split by source, and fetching a real .deb."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess

import numpy as np
import pytest

from jobs import demo_photos
from jobs.demo_photos import SOURCES, PhotoFetchError, Source


def test_the_split_is_by_source_and_holds_out_what_gq_demo_shows():
    train = [s for s in SOURCES if s.split == "train"]
    held = [s for s in SOURCES if s.split == "heldout"]
    assert train and held and len(train) + len(held) == len(SOURCES)
    assert len({s.name for s in SOURCES}) == len(SOURCES)
    # gq demo shows scikit-image's samples: they must be pictures the model never trained on
    assert "scikit-image" in {s.name for s in held}
    # no picture is in two sources (the same wallpaper shipped twice would leak across the split)
    hashes = [h for s in SOURCES for h in s.files.values()]
    assert len(hashes) == len(set(hashes))
    for s in SOURCES:
        assert s.licence and s.files
        assert s.kind in ("deb", "wheel") and (s.kind != "deb" or len(s.deb_sha256) == 64)


@pytest.mark.parametrize("module,source", [("skimage", "scikit-image"), ("matplotlib", "matplotlib")])
def test_pins_match_the_installed_wheels_pictures(module, source):
    """The pinned SHA-256s are the real files: the installed scikit-image and matplotlib are the pinned versions
    (pyproject's demo extra), and their pictures hash to the pins."""
    mod = pytest.importorskip(module)
    src = next(s for s in SOURCES if s.name == source)
    if mod.__version__ != src.package.split("==")[1]:
        pytest.skip(f"installed {module} {mod.__version__}, pinned {src.package}")
    site = os.path.dirname(os.path.dirname(mod.__file__))
    for member, sha in src.files.items():
        with open(os.path.join(site, member), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == sha, member


def _build_deb(tmp_path, files: dict[str, bytes]) -> bytes:
    """A real .deb built by dpkg-deb (xz-compressed data.tar), with ``files`` under its root."""
    root = tmp_path / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text("Package: gq-test-photos\nVersion: 1.0\nArchitecture: all\n"
                                             "Maintainer: gq <gq@example.invalid>\nDescription: test\n")
    for member, data in files.items():
        (root / member).parent.mkdir(parents=True, exist_ok=True)
        (root / member).write_bytes(data)
    out = tmp_path / "gq-test-photos_1.0_all.deb"
    subprocess.run(["dpkg-deb", "-Zxz", "--build", str(root), str(out)], check=True, capture_output=True)
    return out.read_bytes()


def _png(rgba: tuple[int, int, int, int], size=(30, 20)) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGBA", size, rgba).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb to build a real .deb")
def test_fetch_unpacks_a_real_deb_and_checks_every_pin(tmp_path):
    member = "usr/share/backgrounds/half.png"
    picture = _png((0, 0, 255, 128))
    deb = _build_deb(tmp_path, {member: picture, "usr/share/doc/x/copyright": b"CC0"})
    pool = tmp_path / "pool" / "g"
    pool.mkdir(parents=True)
    (pool / "gq-test-photos_1.0_all.deb").write_bytes(deb)
    src = Source("test-photos", "train", "deb", "g/gq-test-photos_1.0_all.deb", "CC0",
                 {member: hashlib.sha256(picture).hexdigest()}, deb_sha256=hashlib.sha256(deb).hexdigest())
    url = "file://" + str(tmp_path / "pool") + "/"

    photos = demo_photos.fetch(str(tmp_path / "cache"), sources=(src,), pool=url)
    assert [open(p, "rb").read() for p in photos["test-photos"]] == [picture]

    # the training copies: shorter side at each scale, transparency composited on white
    written = demo_photos.write_training_set(photos, str(tmp_path / "train"), (40, 60), sources=(src,))
    from PIL import Image

    sizes = sorted(Image.open(p).size for p in written)
    assert sizes == [(60, 40), (90, 60)]
    px = np.asarray(Image.open(written[0]).convert("RGB"))[5, 5]
    assert abs(int(px[0]) - 127) <= 2 and abs(int(px[2]) - 255) <= 1  # 50% blue over white

    wrong_pin = Source(**{**src.__dict__, "files": {member: "0" * 64}})
    with pytest.raises(PhotoFetchError, match="half.png has SHA-256"):
        demo_photos.fetch(str(tmp_path / "cache2"), sources=(wrong_pin,), pool=url)
    missing = Source(**{**src.__dict__, "files": {"usr/share/backgrounds/absent.png": "0" * 64}})
    with pytest.raises(PhotoFetchError, match="not in the package"):
        demo_photos.fetch(str(tmp_path / "cache3"), sources=(missing,), pool=url)
    wrong_deb = Source(**{**src.__dict__, "deb_sha256": "1" * 64})
    with pytest.raises(PhotoFetchError, match="expected 1111"):
        demo_photos.fetch(str(tmp_path / "cache4"), sources=(wrong_deb,), pool=url)


def test_ar_members_refuses_what_is_not_a_deb():
    with pytest.raises(PhotoFetchError, match="not an ar archive"):
        demo_photos.ar_members(b"PK\x03\x04 a zip file")
