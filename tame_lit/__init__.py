"""tame-lit: trainable attention heads (TAME, SA-CAM) that explain frozen CNN classifiers."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tame-lit")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"

__all__ = ["__version__", "load_explainer"]


def __getattr__(name: str):
    if name == "load_explainer":  # imported lazily: `import tame_lit` stays light
        from tame_lit.loading import load_explainer

        return load_explainer
    raise AttributeError(f"module 'tame_lit' has no attribute {name!r}")
