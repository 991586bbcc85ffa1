"""Kong's `correlation-id` plugin: a unique ID per request, sent upstream and optionally back."""
