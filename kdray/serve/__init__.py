"""Serving: the plain predictor and the thin Ray Serve deployment over it."""
