"""tame-lit: trainable attention heads (TAME, SA-CAM) that explain frozen CNN classifiers."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tame-lit")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"

__all__ = ["__version__"]
