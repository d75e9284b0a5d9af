"""TextDiff: report-guided, label-efficient segmentation on frozen diffusion features (Feng, MICCAI 2024)."""
from .backbone import DiffusionFeatures, decoder_units, default_blocks, load_unet
from .data import Image, Sample, read_image, read_lvit, read_mask, write_label
from .head import FusionHead
from .model import ModelConfig, TextDiffModel
from .text import ReportEncoder

__version__ = "0.1.0"
__all__ = ["DiffusionFeatures", "FusionHead", "Image", "ModelConfig", "ReportEncoder", "Sample", "TextDiffModel",
           "decoder_units", "default_blocks", "load_unet", "read_image", "read_lvit", "read_mask", "write_label"]
