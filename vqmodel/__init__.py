"""vqmodel: the VQ-VAE model library (pure torch)."""

from vqmodel.checkpoint import (
    CheckpointError,
    capture_rng_state,
    load_metadata,
    load_model,
    load_training_state,
    restore_rng_state,
    save_checkpoint,
    write_bytes_atomic,
)
from vqmodel.codebook import Codebook
from vqmodel.compat import VectorQuant
from vqmodel.config import QuantizerConfig
from vqmodel.kmeans import kmeans, kmeans_plus_plus
from vqmodel.quantizer import VectorQuantizer
from vqmodel.search import nearest_codes
from vqmodel.usage import UsageAccumulator, perplexity_of_counts
from vqmodel.vqvae import VQVAE, ModelConfig

__all__ = [
    "VQVAE",
    "CheckpointError",
    "Codebook",
    "ModelConfig",
    "QuantizerConfig",
    "UsageAccumulator",
    "VectorQuant",
    "VectorQuantizer",
    "capture_rng_state",
    "kmeans",
    "kmeans_plus_plus",
    "load_metadata",
    "load_model",
    "load_training_state",
    "nearest_codes",
    "perplexity_of_counts",
    "restore_rng_state",
    "save_checkpoint",
    "write_bytes_atomic",
]
