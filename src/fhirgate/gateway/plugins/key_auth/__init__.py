"""Kong's `key-auth` plugin."""
