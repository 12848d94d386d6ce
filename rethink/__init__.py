"""rethink: config-driven experiments with EfficientNet and EfficientNetV2."""

__version__ = "0.1.0"
