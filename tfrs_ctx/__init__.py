"""tfrs-ctx: a contextual sequential two-tower ad candidate generator."""

__version__ = "0.1.0"
