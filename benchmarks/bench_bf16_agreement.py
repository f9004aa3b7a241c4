#!/usr/bin/env python
"""How often a bf16 encoder gives the same tokens as fp32 (not a test; prints markdown, ``--json`` writes numbers).

``gq tokenize --precision bf16`` runs the encoder under ``torch.autocast(bfloat16)`` on GPU actors and the codebook
search in fp32 (gq_pipeline/worker.py, encode_uint8). bf16 moves mu and sigma by ~1e-2 relative, which can flip the argmax for
posteriors that sit near the boundary between two codewords. This measures, on real images preprocessed exactly as
the pipeline does:

* token agreement: the fraction of tokens equal under bf16 and fp32, and of images whose every token agrees;
* what a flip costs: PSNR of the decoded reconstruction (fp32 decoder) from fp32 tokens and from bf16 tokens;
* max |mu_bf16 - mu_fp32| relative to the spread of mu.

Default model: the built-in ``demo`` (trained, the official layout at small width); pass ``--model`` (and
``--preset``/``--config`` for a reference ``.ckpt``) to measure the released model. Runs on CUDA when available (the
case that matters), else on CPU with CPU autocast, whose bf16 kernels differ from the GPU's: CPU numbers only
indicate the order of magnitude.
"""
from __future__ import annotations

import argparse
import datetime
import io
import platform

import torch

from report import print_table, write_json  # benchmarks/report.py (this script's folder is on sys.path)

SKIMAGE_NAMES = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "colorwheel", "retina",
                 "hubble_deep_field", "logo", "camera", "coins", "brick", "grass", "gravel", "moon", "clock", "page",
                 "stereo_motorcycle", "cell", "text")


def sample_images(size: int) -> list[torch.Tensor]:
    """skimage's bundled pictures as PNG bytes, through ``preprocess_image`` (the pipeline's exact path)."""
    from PIL import Image

    from gq_pipeline import preprocess_image
    from jobs.demo import _sample_array

    out = []
    for name in SKIMAGE_NAMES:
        buf = io.BytesIO()
        Image.fromarray(_sample_array(name)).save(buf, format="PNG")
        out.append(preprocess_image(buf.getvalue(), size))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--preset")
    ap.add_argument("--config")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--json", help="also write the numbers here")
    args = ap.parse_args(argv)

    from gq_model.metrics.image import psnr  # gq eval's clamped per-image PSNR
    from gq_model.loading import load_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(args.model, config=args.config, preset=args.preset).to(device).eval()
    images = sample_images(args.image_size)
    same = total = whole = 0
    p32, p16, dmu, spread = [], [], 0.0, 0.0
    with torch.no_grad():
        for i in range(0, len(images), args.batch_size):
            x = torch.stack(images[i:i + args.batch_size]).to(device)
            mu32, lv32 = model.encode_moments(x)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                mu16, lv16 = model.encode_moments(x)
            mu16, lv16 = mu16.float(), lv16.float()
            t32, _ = model.quantizer.quantize(mu32.float(), lv32.float())
            t16, _ = model.quantizer.quantize(mu16, lv16)
            eq = t32 == t16
            same += int(eq.sum())
            total += eq.numel()
            whole += int(eq.flatten(1).all(1).sum())
            dmu = max(dmu, float((mu16 - mu32).abs().max()))
            spread = max(spread, float(mu32.std()))
            p32.append(psnr(model.detokenize(t32), x).cpu())
            p16.append(psnr(model.detokenize(t16), x).cpu())
    p32, p16 = torch.cat(p32), torch.cat(p16)
    res = {
        "date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name() if device.type == "cuda"
        else f"CPU ({platform.machine()}, torch {torch.__version__})", "model": args.model,
        "model_fingerprint": model.model_fingerprint, "images": len(images), "image_size": args.image_size,
        "tokens": total, "token_agreement": same / total, "images_all_tokens_equal": whole / len(images),
        "psnr_fp32_tokens": float(p32.mean()), "psnr_bf16_tokens": float(p16.mean()),
        "psnr_delta_worst_image": float((p32 - p16).abs().max()), "max_abs_dmu_over_std_mu": dmu / max(spread, 1e-12),
    }
    print(f"## bf16 encoder vs fp32: {res['device']}, model {args.model} ({res['model_fingerprint']}), "
          f"{len(images)} images at {args.image_size}px, {total} tokens\n")
    print_table(["token agreement", "images with every token equal", "PSNR from fp32 tokens", "PSNR from bf16 tokens",
                 "worst-image PSNR change", "max abs dmu / std(mu)"],
                [[f"{res['token_agreement']:.4%}", f"{res['images_all_tokens_equal']:.0%}",
                  f"{res['psnr_fp32_tokens']:.2f} dB", f"{res['psnr_bf16_tokens']:.2f} dB",
                  f"{res['psnr_delta_worst_image']:.3f} dB", f"{res['max_abs_dmu_over_std_mu']:.4f}"]])
    write_json(args.json, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
