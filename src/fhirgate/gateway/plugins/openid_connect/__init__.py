"""Kong's `openid-connect` plugin (bearer JWT access tokens, JWKS discovery and rotation)."""
