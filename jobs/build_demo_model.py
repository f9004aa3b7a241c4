"""Rebuild the built-in ``demo`` model in one command::

    .venv/bin/python -m jobs.build_demo_model            # train (~25 min on 2 CPU cores) + export + eval + card

1. trains ``jobs/demo_model.yaml`` with the project's training job (``python -m jobs.train``, a fresh run);
2. copies the bundle it exports into ``gq_model/builtin/demo/`` (``GQModel.from_pretrained("demo")``);
3. writes held-out crops (images never trained on) and runs ``gq eval`` on them (``python -m jobs.eval``);
4. writes ``gq_model/builtin/demo/MODEL_CARD.md`` and ``eval.json`` from that eval and the training log.

``--skip-train`` reuses an existing run (its ``bundle/``) and redoes steps 2-4; ``--run-dir`` overrides
``run.out_dir``; extra ``section.key=value`` arguments are passed to the training job (recorded in the card).
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
# Never in the training data (see data.train in jobs/demo_model.yaml): chelsea (== skimage.data.cat) and the left
# view of stereo_motorcycle. Crops are taken after resizing the shorter side to 256 px, as in training (data.resize).
HELDOUT = ("chelsea", "stereo_motorcycle")
HELDOUT_RESIZE = 256
CROP = 128
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


def write_heldout_crops(folder: str) -> list[str]:
    """Six non-overlapping 128x128 crops (a 2x3 grid, centred) of each held-out image, resized like the training data."""
    import numpy as np
    from PIL import Image

    from jobs.demo import _sample_array

    os.makedirs(folder, exist_ok=True)
    paths = []
    for name in HELDOUT:
        im = Image.fromarray(_sample_array(name))
        s = HELDOUT_RESIZE / min(im.size)
        im = im.resize((round(im.width * s), round(im.height * s)), Image.BICUBIC)
        a = np.asarray(im)
        h, w = a.shape[:2]
        rows, cols = h // CROP, w // CROP
        y0, x0 = (h - rows * CROP) // 2, (w - cols * CROP) // 2
        for r in range(rows):
            for c in range(cols):
                crop = a[y0 + r * CROP: y0 + (r + 1) * CROP, x0 + c * CROP: x0 + (c + 1) * CROP]
                path = os.path.join(folder, f"{name}_r{r}c{c}.png")
                Image.fromarray(crop).save(path)
                paths.append(path)
    return paths


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


def write_card(dest: str, report: dict, meta: dict) -> str:
    rec = report.get("reconstruction", {})
    q, g = rec.get("quantized", {}), rec.get("gaussian", {})

    def f(d: dict, k: str, fmt: str = "{:.2f}") -> str:
        v = d.get(k)
        if isinstance(v, dict):
            return (fmt + " ± " + fmt).format(v["mean"], v.get("std", 0.0)) if "mean" in v else "n/a"
        return fmt.format(v) if isinstance(v, (int, float)) else "n/a"

    cb = report.get("codebook", {})
    kl = report.get("kl_bits", {})
    size = sum(os.path.getsize(os.path.join(dest, n)) for n in ("config.json", "model.safetensors"))
    mon = meta.get("train_facts", {}).get("monitor", [])
    mon_rows = "\n".join(f"| {m['step']} | {m['psnr_q']:.2f} | {m['psnr_g']:.2f} |" for m in mon)
    card = f"""# Built-in model `demo`

`GQModel.from_pretrained("demo")` — a small Gaussian Quant tokenizer with the released model's **layout** (UNet,
downsampling f=8, 16 latent channels, one sub-codebook of K=2^16 with m=16, i.e. one 16-bit token per 8x8 patch =
0.25 bits per pixel) at a small width (channels 32, one res-block per level, 1.0 M encoder+decoder parameters), trained
for a few minutes on a CPU. It exists so that `make demo`, the tests and the docs run without downloading anything.
**It is a demo, not a useful tokenizer**: reconstructions are blurry but recognizable. For real work convert the
official checkpoint (`gq convert`) or train with `configs/train_sd3unet_gq_0.25.yaml`.

| | |
|---|---|
| codebook fingerprint | `{meta['codebook_fingerprint']}` (the same codebook as every K=2^16, m=16, seed-0 GQ model) |
| model fingerprint | `{meta['model_fingerprint']}` |
| bundle | `config.json` + `model.safetensors`, {size / 1e6:.2f} MB (the 4 MB fp32 codebook included) |
| built | {meta['built_utc']} by `python -m jobs.build_demo_model` |

## Data

scikit-image's bundled sample images (`skimage.data`, shipped inside the scikit-image wheel, no download):
`{meta['train_images']}`. Grayscale images are replicated to RGB, RGBA is composited on white. Each image's shorter
side is resized to 256 px, then random 64x64 crops with horizontal flips are taken (16 passes per epoch).

Held out (never trained on): {', '.join(f'`{h}`' for h in HELDOUT)} (`cat` is the same photo as `chelsea` and is not
in the training list either). `chelsea` is also the training job's monitoring image.

## Recipe

Exactly `jobs/demo_model.yaml` (copied below), run by the project's own training job (`gq train`, plain PyTorch
engine, one process, `run.threads: {meta.get('threads', 1)}`): L1 reconstruction with a learned log-variance, KL weight 0.1
with the TDC controller holding every group's KL near log2 K = 16 bits, Adam at {meta['optim']}. No perceptual (LPIPS) term and no
discriminator: their weights are not shipped, and on a CPU budget they would not pay off.

* steps: **{meta['steps']}** generator steps of batch 8 ({meta['steps'] * 8} crops of 64x64)
* training wall time: **{meta['train_wall_s'] / 60:.1f} min** on a shared 2-core CPU machine ({meta['machine']})
* overrides: `{' '.join(meta['overrides']) or 'none'}`{(chr(10) + '* note: ' + meta['note']) if meta.get('note') else ''}

Monitoring PSNR of the training job on the held-out image (`chelsea`, centre 64x64 crop, 64 tokens):

| step | PSNR quantized (dB) | PSNR Gaussian mean (dB) |
|---|---|---|
{mon_rows}

## Metrics on held-out crops (`gq eval`)

`gq eval --model gq_model/builtin/demo --input <crops> --image-size {CROP}` on {report['protocol']['num_images']}
non-overlapping {CROP}x{CROP} crops of the held-out images (shorter side resized to {HELDOUT_RESIZE} first, as in
training). The full report is `eval.json` next to this card.

| | PSNR (dB) | SSIM |
|---|---|---|
| quantized (tokens -> image) | **{f(q, 'psnr')}** | {f(q, 'ssim', '{:.3f}')} |
| Gaussian mean μ (no quantization) | {f(g, 'psnr')} | {f(g, 'ssim', '{:.3f}')} |

(mean ± standard deviation over crops)

Codebook: {cb.get('used', 'n/a')} distinct codes in {cb.get('tokens', 'n/a')} tokens, perplexity
{cb.get('perplexity', float('nan')):.1f}. KL per token: mean {kl.get('mean', float('nan')):.2f} bits (target
log2 K = 16; the demo is trained far too briefly for the TDC controller to pull every token into the 16 ± 0.5 bit
band, so `gq eval`'s codebook-size advisor calls K "{report.get('advisor', {}).get('verdict', 'n/a')}" — expected for
this model, not for the official one).

```
{report.get('summary', '')}
```

LPIPS and rFID are not reported: their network weights are not shipped (see docs/eval.md).

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

    with open(CONFIG, encoding="utf-8") as fh:
        config_text = fh.read()
    cfg = yaml.safe_load(config_text)
    run_dir = args.run_dir or cfg["run"]["out_dir"]
    overrides = list(args.overrides)
    os.makedirs(run_dir, exist_ok=True)
    log_path = os.path.join(run_dir, "train.log")
    times_path = os.path.join(run_dir, "build_times.json")

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

    # 3. eval on held-out crops
    crops = os.path.join(run_dir, "heldout_crops")
    shutil.rmtree(crops, ignore_errors=True)
    write_heldout_crops(crops)
    eval_json = os.path.join(args.dest, "eval.json")
    _sh([sys.executable, "-m", "jobs.eval", "--model", args.dest, "--input", crops, "--image-size", str(CROP),
         "--no-lpips", "--no-fid", "--json", eval_json])  # no metric weights are shipped (see the card)
    report = json.load(open(eval_json, encoding="utf-8"))
    report["model"]["url"] = "demo"  # not this machine's path
    report.get("protocol", {}).pop("files", None)
    text = json.dumps(report, indent=2).replace("file://" + ROOT + "/", "").replace(ROOT + "/", "")
    with open(eval_json, "w", encoding="utf-8") as fh:
        fh.write(text)
    report = json.loads(text)

    # 4. model card
    import platform

    meta = {"codebook_fingerprint": model.fingerprint, "model_fingerprint": model.model_fingerprint,
            "built_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "train_images": cfg["data"]["train"].split(":", 1)[1].replace(",", ", "),
            "steps": steps, "train_wall_s": float(times.get("train_wall_s", float("nan"))),
            "overrides": times.get("overrides", overrides), "note": times.get("note"), "threads": cfg["run"].get("threads"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs visible",
            "config_text": config_text, "train_facts": _train_facts(log_path), "optim": _optim_text(cfg)}
    card = write_card(args.dest, report, meta)
    print(f"built-in model: {args.dest} ({size / 1e6:.2f} MB, {steps} steps, "
          f"{meta['train_wall_s'] / 60:.1f} min training); card {card}\n{report.get('summary', '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
