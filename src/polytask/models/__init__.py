"""Backbones (shared input encoders), heads and architectures."""
