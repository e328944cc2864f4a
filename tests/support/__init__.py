"""Helpers shared by the test modules; a test module imports these, never another test module.

- ``hardware``: skip-or-fail for an absent backend (fail in CI, skip on a developer machine).
- ``softhsm``: pytest plugin, the run's throwaway SoftHSM2 tokens.
- ``tpm``: pytest plugin, swtpm instances and a tpm2-pkcs11 store over tpm2-abrmd.
- ``servers``: pytest plugin, the local AS/RS (``dpop_hsm.testing``) and the signer matrix.
- ``children``: entry points run in a child process, their job as JSON on stdin.
- ``verifier``: the independent proof verifier (``cryptography`` only, no ``dpop_hsm`` code).
- ``raw_http``: a raw-socket HTTP server for hostile-server tests, and a raw-bytes client.
- ``adapters``: one small driver per HTTP adapter, for the adapter contract suite.
- ``oauth``: drives the local AS's login, PAR, device and refresh endpoints like a browser would.
- ``redis``: pytest plugin, a private redis-server on a free 127.0.0.1 port.
- ``caches``: the local servers and the TokenClient every token-cache suite uses.
- ``fleet``: starts, commands and collects the fleet tests' worker processes.
- ``fleet_worker``: one worker process of the fleet tests, driven over stdio.
- ``cli``: pytest plugin and helpers for running ``dpop-hsm`` in-process and as a child.
- ``login``: the developer at the browser or device page (``dpop_hsm.login``, ``dpop-hsm login``).

The plugins are registered in ``tests/conftest.py``.
"""
