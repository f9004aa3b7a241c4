"""Training losses of the GQ autoencoder: LPIPS (VGG16), the PatchGAN discriminator and the VF alignment term.

Everything here is plain torch. LPIPS reads torchvision's ``vgg16`` state dict and the published LPIPS linear heads
(``vgg.pth``) from paths you give (local or any fsspec URL), else from gq's cache or a verified download
(:mod:`gq_model.weights`, ``gq weights fetch lpips-vgg``); the VF feature model is loaded from a path.
"""
from gq_model.losses.alignment import VFAlignmentLoss, feature_grid, load_feature_model
from gq_model.losses.discriminator import (ActNorm, NLayerDiscriminator, adaptive_weight, hinge_d_loss,
                                           vanilla_d_loss)
from gq_model.losses.lpips import LPIPS, VGG16Features, build_lpips

__all__ = ["LPIPS", "VGG16Features", "build_lpips", "ActNorm", "NLayerDiscriminator", "hinge_d_loss",
           "vanilla_d_loss", "adaptive_weight", "VFAlignmentLoss", "load_feature_model", "feature_grid"]
