"""Formatting and plotting of results computed elsewhere: markdown tables (tables) and overlays/plots (viz)."""
