"""BLIP-2 from the terminal. Importing this package stays cheap: heavy modules load inside commands."""

__version__ = "0.1.0"
