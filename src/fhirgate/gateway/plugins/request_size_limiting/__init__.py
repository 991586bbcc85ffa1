"""Kong's `request-size-limiting` plugin: refuse request bodies larger than a limit."""
