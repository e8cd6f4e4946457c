"""Benchmarking: synthetic signals, demo images, timing and reports (built on ``vtoken.reduce``)."""
