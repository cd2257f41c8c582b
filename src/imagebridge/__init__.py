"""ImageBridge: exchange medical images and reports between hospitals."""

__version__ = "0.1.0"
