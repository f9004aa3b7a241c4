"""``gq eval`` end to end on the tiny model and a handful of generated images: the JSON report, its numbers against an
independent computation, the weight-file loading paths, and the Ray / torchrun splits giving the same totals."""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gq_model import GQModel
from jobs.cli import main as gq_main
from gq_model.tdc import kl_bits_per_group
from jobs.eval import list_images
from tests.helpers import encode_image, free_port, rgb_bytes

REPO = Path(__file__).resolve().parents[1]
SIZES = [(40, 56), (64, 32), (32, 32), (48, 48), (35, 70)]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The CPUs are shared: with oversubscribed cores MKL's threaded eigh (rFID's 2048x2048) runs ~10x slower than
    on one thread, so these runs use one, like the torchrun and Ray workers do."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory):
    """5 readable images (PNG/JPEG, one nested, one RGBA), a corrupt one, a text file and a hidden file."""
    from PIL import Image

    root = tmp_path_factory.mktemp("eval_images")
    (root / "sub").mkdir()
    for i, (h, w) in enumerate(SIZES):
        name = f"sub/img{i}.png" if i == 3 else f"img{i}.{'png' if i % 2 else 'jpg'}"
        (root / name).write_bytes(rgb_bytes(h, w, seed=i, fmt="PNG" if name.endswith("png") else "JPEG"))
    rgba = Image.new("RGBA", (36, 36), (200, 10, 10, 128))
    (root / "img5.png").write_bytes(encode_image(rgba, "PNG"))
    (root / "img6_corrupt.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(rgb_bytes(32, 32, seed=9, fmt="PNG"))
    return str(root)


def _gq(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = gq_main(["eval", *map(str, argv)])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def single(images_dir, tiny_model_dir, tmp_path_factory):
    """One in-process run without metric weights: (report, stdout, stderr)."""
    out = tmp_path_factory.mktemp("eval_out") / "nested" / "report.json"
    rc, stdout, stderr = _gq("--model", tiny_model_dir, "--input", images_dir, "--image-size", 32,
                             "--batch-size", 4, "--no-lpips", "--no-fid", "--json", out)
    assert rc == 0, stderr
    return json.loads(out.read_text()), stdout, stderr


def test_list_images_sorted_filtered_limited(images_dir):
    files, listed = list_images(images_dir)
    names = [f.split(images_dir, 1)[1].lstrip("/") for f in files]
    assert names == ["img0.jpg", "img1.png", "img2.jpg", "img4.jpg", "img5.png", "img6_corrupt.jpg", "sub/img3.png"]
    assert listed == 7 and all(f.startswith("file://") for f in files)
    assert list_images(images_dir, limit=2) == (files[:2], 7)
    assert list_images(os.path.join(images_dir, "*.png"))[0] == [files[1], files[4]]
    with pytest.raises(FileNotFoundError):
        list_images(os.path.join(images_dir, "missing"))
    with pytest.raises(ValueError, match="limit"):
        list_images(images_dir, limit=0)


def test_report_has_every_field_and_skip_warnings(single):
    report, stdout, stderr = single
    assert set(report) >= {"gq_eval_version", "model", "protocol", "weights", "reconstruction", "codebook", "kl_bits",
                           "advisor", "warnings", "summary", "elapsed_s"}
    for kind in ("quantized", "gaussian"):
        r = report["reconstruction"][kind]
        for m in ("psnr", "psnr_unclamped", "ssim", "ssim_unclamped"):
            assert math.isfinite(r[m]["mean"]) and r[m]["std"] >= 0
        assert r["lpips"] is None and r["rfid"] is None
    p = report["protocol"]
    assert p["num_listed"] == 7 and p["num_images"] == 6 and p["image_size"] == 32 and p["mode"] == "single"
    assert [s["path"].rsplit("/", 1)[1] for s in p["skipped_images"]] == ["img6_corrupt.jpg"]
    assert report["weights"] == {"lpips": None, "inception": None}
    assert any("LPIPS skipped" in w for w in report["warnings"]) and "LPIPS skipped" in stderr
    assert any("rFID skipped" in w for w in report["warnings"]) and "rFID skipped" in stderr
    assert "img6_corrupt.jpg" in stderr
    assert stdout.strip() == report["summary"] and stdout.count("\n") == 1 and "quantized: PSNR" in stdout
    cb, kl, adv = report["codebook"], report["kl_bits"], report["advisor"]
    assert cb["tokens"] == 6 * 4 * 4 and cb["codebook_size"] == 4096 and len(cb["per_group"]) == 1
    assert kl["count"] == 6 * 16 and len(kl["per_group_mean"]) == 1 and kl["target_bits"] == 12
    assert adv["verdict"] in ("sufficient", "marginal", "insufficient") and adv["recommended_codebook_size"] >= 2
    assert report["model"]["codebook_fingerprint"] == GQModel.from_pretrained(report["model"]["url"]).fingerprint


def test_numbers_match_an_independent_computation(single, images_dir, tiny_model):
    from gq_pipeline.preprocess import preprocess_image

    report = single[0]
    files = [f for f in list_images(images_dir)[0] if "corrupt" not in f]
    x = torch.stack([preprocess_image(Path(f[len("file://"):]).read_bytes(), 32) for f in files])
    with torch.no_grad():
        mu, logvar = tiny_model.encode_moments(x)
        idx, zhat = tiny_model.quantizer.quantize(mu, logvar)
        recs = {"quantized": tiny_model.decoder(zhat), "gaussian": tiny_model.decoder(mu)}
    a = (x.double().numpy() + 1) * 127.5
    for kind, rec in recs.items():
        for clamp, key in ((True, "psnr"), (False, "psnr_unclamped")):
            r = rec.double().numpy()
            b = (np.clip(r, -1, 1) if clamp else r) * 127.5 + 127.5
            per_image = 10 * np.log10(255.0 ** 2 / ((a - b) ** 2).reshape(len(files), -1).mean(1))
            assert report["reconstruction"][kind][key]["mean"] == pytest.approx(per_image.mean(), rel=1e-9)
            assert report["reconstruction"][kind][key]["std"] == pytest.approx(per_image.std(), rel=1e-6)
    counts = np.bincount(idx.flatten().numpy(), minlength=4096)
    assert report["codebook"]["used"] == int((counts > 0).sum())
    bits = kl_bits_per_group(mu, logvar.clamp(-30, 20), 16, "strided")
    assert report["kl_bits"]["mean"] == pytest.approx(bits.double().mean().item(), rel=1e-6)
    assert report["kl_bits"]["max"] == pytest.approx(bits.max().item(), rel=1e-6)


def _write_random_weight_files(root: Path) -> tuple[Path, Path]:
    """Random weights saved exactly in the published formats: the FID Inception state dict (no num_batches_tracked,
    like the 2018 file) and torchvision AlexNet + LPIPS alex.pth in a directory."""
    from gq_model.metrics.inception import FIDInceptionV3
    from gq_model.metrics.lpips_alex import LPIPSAlex

    torch.manual_seed(1)
    inc = {k: v for k, v in FIDInceptionV3().state_dict().items() if not k.endswith("num_batches_tracked")}
    inc_path = root / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(inc, inc_path)
    lp = LPIPSAlex().state_dict()
    lp_dir = root / "lpips"
    lp_dir.mkdir()
    torch.save({**{k[4:]: v for k, v in lp.items() if k.startswith("net.")},
                "classifier.6.weight": torch.zeros(10, 4), "classifier.6.bias": torch.zeros(10)},
               lp_dir / "alexnet-owt-7be5be79.pth")
    torch.save({k: v.abs() for k, v in lp.items() if k.startswith("lin")}, lp_dir / "alex.pth")
    return inc_path, lp_dir


def test_eval_with_weight_files_in_the_standard_formats(images_dir, tiny_model_dir, tmp_path):
    inc_path, lp_dir = _write_random_weight_files(tmp_path)
    out = tmp_path / "r.json"
    rc, stdout, stderr = _gq("--model", tiny_model_dir, "--input", images_dir, "--image-size", 32, "--limit", 2,
                             "--lpips-weights", lp_dir, "--inception-weights", inc_path, "--json", out)
    assert rc == 0, stderr
    report = json.loads(out.read_text())
    for kind in ("quantized", "gaussian"):
        r = report["reconstruction"][kind]
        assert r["lpips"]["mean"] > 0 and math.isfinite(r["rfid"]) and r["rfid"] > -1e-9
    assert report["weights"]["lpips"]["heads"].endswith("alex.pth")
    assert report["weights"]["inception"]["official"] is False
    assert "not the published 6726825d" in stderr and "rFID from 2 < 2048 images" in stderr
    assert not any("skipped:" in w for w in report["warnings"] if "LPIPS" in w or "rFID" in w)
    assert "LPIPS n/a" not in stdout and "rFID n/a" not in stdout


def test_fsspec_memory_input_and_output(images_dir, tiny_model_dir):
    import fsspec

    mem = fsspec.filesystem("memory")
    for f in list_images(images_dir, limit=2)[0]:
        mem.pipe(f"/evalimgs/{f.rsplit('/', 1)[1]}", Path(f[len("file://"):]).read_bytes())
    rc, _, stderr = _gq("--model", tiny_model_dir, "--input", "memory://evalimgs", "--image-size", 32,
                        "--no-lpips", "--no-fid", "--json", "memory://evalout/r.json")
    assert rc == 0, stderr
    report = json.loads(mem.cat("/evalout/r.json"))
    assert report["protocol"]["num_images"] == 2 and report["protocol"]["first_file"] == "memory:///evalimgs/img0.jpg"


def test_s3_input_through_storage_options(images_dir, tiny_model_dir, moto_s3, s3, tmp_path):
    """gq eval lists and reads like gq tokenize: its --storage-options reach the store (an S3 endpoint on moto)."""
    s3.mkdir("gq-eval")
    for f in list_images(images_dir, limit=3)[0]:
        s3.pipe(f"gq-eval/imgs/{f.rsplit('/', 1)[1]}", Path(f[len("file://"):]).read_bytes())
    s3.pipe("gq-eval/imgs/.hidden.png", b"skipped: hidden names are not inputs")
    out = tmp_path / "r.json"
    rc, _, stderr = _gq("--model", tiny_model_dir, "--input", "s3://gq-eval/imgs", "--image-size", 32,
                        "--storage-options", json.dumps(moto_s3), "--no-lpips", "--no-fid", "--json", out)
    assert rc == 0, stderr
    report = json.loads(out.read_text())
    assert report["protocol"]["num_images"] == 3 and report["protocol"]["first_file"].startswith("s3://gq-eval/")
    assert not report["protocol"]["skipped_images"]


def _assert_same_numbers(a: dict, b: dict):
    """Equal up to float32 conv round-off: the shards batch other images together than the single run does."""
    for kind in ("quantized", "gaussian"):
        for m in ("psnr", "psnr_unclamped", "ssim", "ssim_unclamped"):
            assert a["reconstruction"][kind][m]["mean"] == pytest.approx(b["reconstruction"][kind][m]["mean"],
                                                                         rel=1e-6)
    assert a["codebook"]["tokens"] == b["codebook"]["tokens"] and a["codebook"]["used"] == b["codebook"]["used"]
    assert a["kl_bits"]["count"] == b["kl_bits"]["count"]
    for q, v in a["kl_bits"]["percentiles"].items():
        assert v == pytest.approx(b["kl_bits"]["percentiles"][q], abs=1 / 64)
    assert a["kl_bits"]["mean"] == pytest.approx(b["kl_bits"]["mean"], rel=1e-6)
    assert a["advisor"]["recommended_log2"] == b["advisor"]["recommended_log2"]
    assert a["protocol"]["files_sha256"] == b["protocol"]["files_sha256"]
    assert [s["path"] for s in a["protocol"]["skipped_images"]] == [s["path"] for s in b["protocol"]["skipped_images"]]


def test_ray_pool_gives_the_single_process_totals(single, images_dir, tiny_model_dir, tmp_path, ray_cluster):
    out = tmp_path / "ray.json"
    rc, _, stderr = _gq("--model", tiny_model_dir, "--input", images_dir, "--image-size", 32, "--batch-size", 4,
                        "--workers", 2, "--no-lpips", "--no-fid", "--json", out)
    assert rc == 0, stderr
    report = json.loads(out.read_text())
    assert report["protocol"]["mode"] == "ray" and report["protocol"]["processes"] == 2
    _assert_same_numbers(report, single[0])


def test_torchrun_gives_the_single_process_totals(single, images_dir, tiny_model_dir, tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun not installed")
    out = tmp_path / "ddp.json"
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [str(torchrun), "--nnodes", "1", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "jobs.eval", "--model", tiny_model_dir, "--input", images_dir,
           "--image-size", "32", "--batch-size", "4", "--no-lpips", "--no-fid", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["protocol"]["mode"] == "torchrun" and report["protocol"]["processes"] == 2
    assert proc.stdout.count("gq eval:") == 1  # only rank 0 prints
    _assert_same_numbers(report, single[0])


@pytest.mark.parametrize("extra, message", [
    (["--limit", "0"], "--limit must be >= 1"),
    (["--batch-size", "0"], "--batch-size"),
    (["--lpips-weights", "/nonexistent/dir"], "missing alex.pth"),
])
def test_bad_arguments_fail_with_a_message(images_dir, tiny_model_dir, extra, message):
    rc, _, stderr = _gq("--model", tiny_model_dir, "--input", images_dir, "--image-size", 32, "--no-fid", *extra)
    assert rc == 1 and message in stderr


def test_reference_checkpoint_needs_its_config(images_dir, tmp_path):
    rc, _, stderr = _gq("--model", tmp_path / "x.ckpt", "--input", images_dir, "--no-lpips", "--no-fid")
    assert rc == 1 and "--reference-config or --preset" in stderr


def test_summary_shows_unclamped_numbers_and_the_report_says_what_is_comparable(single):
    report, stdout, _ = single
    q = report["reconstruction"]["quantized"]
    assert f"PSNR {q['psnr']['mean']:.2f} (unclamped {q['psnr_unclamped']['mean']:.2f})" in stdout
    assert f"SSIM {q['ssim']['mean']:.4f} (unclamped {q['ssim_unclamped']['mean']:.4f})" in stdout
    assert "MS-SSIM n/a (unclamped n/a)" in stdout and "preprocess gq" in stdout
    assert q["msssim"] is None and q["msssim_unclamped"] is None  # 32 px < 256: the reference reports NaN
    assert any("MS-SSIM not computed" in w for w in report["warnings"])
    pc = report["paper_comparable"]
    assert pc["numbers"] == ["reconstruction.quantized.psnr_unclamped", "reconstruction.quantized.ssim_unclamped",
                             "reconstruction.quantized.msssim_unclamped"]  # LPIPS/rFID on clamped input: not
    assert pc["conditions"] == {"preprocess_reference": False, "image_size_256": False,
                                "perceptual_input_unclamped": False, "at_least_2048_images": False}
    assert pc["all_conditions_met"] is False
    assert report["protocol"]["preprocess_policy"] == "gq" and "bicubic" in report["protocol"]["preprocess"]


def test_reference_preprocessing_and_ms_ssim_at_256(images_dir, tiny_model_dir, tiny_model, tmp_path):
    """--preprocess reference at 256 px: MS-SSIM is reported, and every pixel metric equals a direct computation on
    the reference pipeline's pixels."""
    from gq_model.metrics import ms_ssim, psnr
    from gq_pipeline.preprocess import preprocess_image

    out = tmp_path / "r.json"
    rc, stdout, stderr = _gq("--model", tiny_model_dir, "--input", os.path.join(images_dir, "img[0-2].*"),
                             "--image-size", 256, "--preprocess", "reference", "--perceptual-input", "unclamped",
                             "--no-lpips", "--no-fid", "--json", out)
    assert rc == 0, stderr
    report = json.loads(out.read_text())
    files = list_images(os.path.join(images_dir, "img[0-2].*"))[0]
    x = torch.stack([preprocess_image(Path(f[len("file://"):]).read_bytes(), 256, policy="reference") for f in files])
    with torch.no_grad():
        mu, logvar = tiny_model.encode_moments(x)
        rec = tiny_model.decoder(tiny_model.quantizer.quantize(mu, logvar)[1])
    q = report["reconstruction"]["quantized"]
    for key, fn, clamp in (("psnr_unclamped", psnr, False), ("msssim", ms_ssim, True),
                           ("msssim_unclamped", ms_ssim, False)):
        assert q[key]["mean"] == pytest.approx(fn(x, rec, clamp=clamp).mean().item(), rel=1e-6), key
    assert 0 < q["msssim"]["mean"] <= 1 and f"MS-SSIM {q['msssim']['mean']:.4f}" in stdout
    assert report["protocol"]["preprocess_policy"] == "reference" and "bilinear" in report["protocol"]["preprocess"]
    pc = report["paper_comparable"]
    assert pc["conditions"] == {"preprocess_reference": True, "image_size_256": True,
                                "perceptual_input_unclamped": True, "at_least_2048_images": False}
    assert "reconstruction.quantized.lpips" in pc["numbers"] and "reconstruction.quantized.rfid" in pc["numbers"]
    assert not any("MS-SSIM not computed" in w for w in report["warnings"])
