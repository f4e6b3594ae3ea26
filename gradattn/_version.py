"""The package version, in one place (pyproject.toml and CITATION.cff repeat it; a test checks)."""

__version__ = "0.1.0"
