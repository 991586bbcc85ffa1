"""Kong's `ip-restriction` plugin: allow or deny clients by IP address or CIDR range."""
