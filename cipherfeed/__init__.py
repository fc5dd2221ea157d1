"""cipherfeed: a recommendation mesh that scores encrypted interest vectors (CKKS, OpenFHE)."""

__version__ = "0.1.0"
