"""The data plane: HTTP server, upstream pool, router, plugin pipeline and PDK."""
