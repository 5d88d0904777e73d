"""Shared test helpers: simulated KMEs over HTTPS and a canned stand-in KME (``kmes``).

Test modules import them as ``from support.kmes import ...``: pytest puts ``tests/`` on
``sys.path`` (rootdir-relative ``prepend`` import mode, no ``tests/__init__.py``), the same way
``vectors`` and ``testproviders`` are imported.
"""
