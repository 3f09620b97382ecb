"""The package version, in a module of its own so that library modules can read it
without importing the package ``__init__`` (which imports them)."""
__version__ = "0.1.0"
