"""Kong's `file-log` plugin."""
