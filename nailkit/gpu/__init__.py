"""The GPU target: the graph A/B/C split (split, patches), its conversion (export, convert) and parity (parity,
verify), and LiteRT's GPU delegate checks (delegate, swiftshader, op_check, fp16)."""
