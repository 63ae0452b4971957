"""fedpeft: federated fine-tuning of pre-trained language models with parameter-efficient methods."""

__version__ = "0.1.0"
