"""Kong's `rate-limiting` plugin."""
