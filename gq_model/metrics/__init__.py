"""Evaluation metrics for GQ tokenizers, in plain torch (no torchvision, lpips, torch-fidelity or torchmetrics).

* :mod:`.image`: PSNR, SSIM and MS-SSIM on the [0, 255] scale (the reference eval's definitions);
* :mod:`.frechet`: Fréchet distance and mergeable feature statistics (FID);
* :mod:`.inception`: the FID InceptionV3 loading the standard ``pt_inception-2015-12-05`` file;
* :mod:`.lpips_alex`: LPIPS with the AlexNet backbone from the published weight files;
  (both resolve their files through :mod:`gq_model.weights`: explicit path, cache, verified download)
* :mod:`.codebook_usage`: exact usage / entropy / perplexity;
* :mod:`.advisor`: the codebook-size advisor built on the paper's theorem;
* :mod:`.evaluator`: all of the above over a stream of batches, mergeable across processes.

The networks are imported lazily by callers so ``import gq_model.metrics`` stays cheap.
"""
from gq_model.metrics.advisor import Histogram, advise, theorem_bound, theorem_margin_nats
from gq_model.metrics.codebook_usage import CodebookUsage, usage_stats
from gq_model.metrics.frechet import FeatureStats, frechet_distance
from gq_model.metrics.image import ms_ssim, psnr, ssim

__all__ = ["psnr", "ssim", "ms_ssim", "frechet_distance", "FeatureStats", "CodebookUsage", "usage_stats", "Histogram",
           "advise", "theorem_margin_nats", "theorem_bound"]
