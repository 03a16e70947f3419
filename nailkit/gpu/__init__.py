"""The GPU target: the three-graph split and its parity (graphs) and LiteRT's GPU delegate checks (delegate)."""
