"""vqmodel: the VQ-VAE model library (pure torch)."""

from vqmodel.codebook import Codebook
from vqmodel.compat import VectorQuant
from vqmodel.config import QuantizerConfig
from vqmodel.kmeans import kmeans, kmeans_plus_plus
from vqmodel.quantizer import VectorQuantizer
from vqmodel.search import nearest_codes
from vqmodel.usage import UsageAccumulator, perplexity_of_counts

__all__ = [
    "Codebook",
    "QuantizerConfig",
    "UsageAccumulator",
    "VectorQuant",
    "VectorQuantizer",
    "kmeans",
    "kmeans_plus_plus",
    "nearest_codes",
    "perplexity_of_counts",
]
