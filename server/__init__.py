"""latentcast server: sessions, scheduler and one engine behind a WebSocket port."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("latentcast")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
