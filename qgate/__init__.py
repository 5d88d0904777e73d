"""qgate: an encryption gateway whose keys combine QKD (ETSI GS QKD 014) and ML-KEM (FIPS 203)."""

__version__ = "0.1.0"
