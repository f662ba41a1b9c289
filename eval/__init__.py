"""unitok.eval: metrics and harnesses for the tokenizer (rFID, PSNR/SSIM/LPIPS, codebook usage, zero-shot).

from unitok.eval import frechet_distance, InceptionFeatures, psnr, ssim, codebook_stats
from unitok.eval import zero_shot_classifier, zero_shot_accuracy, evaluate_reconstruction
"""

from .codebook import CodebookStats, codebook_stats
from .fid import FeatureStats, frechet_distance, frechet_distance_torch
from .image_metrics import psnr, ssim
from .inception import InceptionFeatures, load_fid_inception
from .quantization import quantization_error
from .tokenizer_eval import evaluate_reconstruction, reference_stats
from .zero_shot import (
    evaluate_zero_shot,
    get_templates,
    imagenet_classnames,
    read_classnames,
    zero_shot_accuracy,
    zero_shot_classifier,
)

__all__ = [
    "CodebookStats",
    "FeatureStats",
    "InceptionFeatures",
    "codebook_stats",
    "evaluate_reconstruction",
    "evaluate_zero_shot",
    "frechet_distance",
    "frechet_distance_torch",
    "get_templates",
    "imagenet_classnames",
    "load_fid_inception",
    "psnr",
    "quantization_error",
    "read_classnames",
    "reference_stats",
    "ssim",
    "zero_shot_accuracy",
    "zero_shot_classifier",
]
