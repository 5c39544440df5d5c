"""Heads on top of the frozen backbone: zero-shot, SigRL (GMC + SVFR), suggestions."""
