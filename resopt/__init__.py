"""resopt: train, compress, export, quantize, build and benchmark ResNet-family classifiers."""

__version__ = "0.1.0"
