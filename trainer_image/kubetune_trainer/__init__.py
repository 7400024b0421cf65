"""kubetune's trainer: the program in the trainer image."""

__version__ = "0.1.0"
"""Goes with the project version in pyproject.toml; the token cache is keyed on it."""
