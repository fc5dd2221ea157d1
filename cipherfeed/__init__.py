"""cipherfeed: a recommendation mesh that scores encrypted interest vectors (CKKS, OpenFHE)."""

import contextlib as _contextlib
import sys as _sys

# py_ecc (reached through eth_account, eth_keys and web3) runs sys.setrecursionlimit(100000) on
# import. With that limit, deeply nested JSON (a request body, a manifest header, a gateway's
# reply) overflows the C stack inside json.loads and the process dies with SIGSEGV instead of
# raising RecursionError. Every cipherfeed process imports this package first: import py_ecc here,
# once, and put the limit back, so that a later import of the eth stack finds it cached and cannot
# raise the limit again.
_LIMIT = min(_sys.getrecursionlimit(), 1000)
with _contextlib.suppress(ImportError):  # not installed: nothing raises the limit
    import py_ecc as _py_ecc  # noqa: F401
_sys.setrecursionlimit(_LIMIT)

__version__ = "0.1.0"
