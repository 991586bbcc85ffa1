"""The built-in authorization server (OAuth 2.0, OpenID Connect, SMART App Launch; issue 5).

So far: its store (`store.AuthStore`, migrations in `auth_schema`) and its signing keys
(`keys.KeyRing`: generated on first start, published as a JWKS, rotated).
"""
