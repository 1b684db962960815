"""The one version source: ``torchckpt.__version__`` re-exports it and pyproject.toml reads it."""

__version__ = "0.1.0"
