"""Calibration data and activation taps (streaming: nothing is kept per sample)."""
