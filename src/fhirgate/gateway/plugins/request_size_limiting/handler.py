"""Kong's `request-size-limiting` plugin (`kong/plugins/request-size-limiting/handler.lua`,
priority 951).

- With a `Content-Length`, the decision is made from the header alone; the body is never read.
  An oversize request that sent `Expect: 100-continue` gets 417 (its body was never asked for),
  any other 413.
- Without one (a chunked body): 411 if `require_content_length`; otherwise the body is buffered up
  to the limit only, and the request is refused with 413 as soon as the limit is passed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fhirgate.gateway.context import BodyTooLarge
from fhirgate.gateway.plugins.base import Plugin, PluginConfig
from fhirgate.gateway.plugins.request_size_limiting.schema import RequestSizeLimitingConfig

if TYPE_CHECKING:
    from fhirgate.gateway.pdk import PDK

MSG_TOO_LARGE = "Request size limit exceeded"
MSG_LENGTH_REQUIRED = "A valid Content-Length header is required"


class Handler(Plugin):
    name = "request-size-limiting"
    priority = 951
    Config = RequestSizeLimitingConfig
    description = "Refuse requests whose body is larger than a configured size."

    config: RequestSizeLimitingConfig

    def __init__(self, config: PluginConfig, instance_id: str = "") -> None:
        if not isinstance(config, RequestSizeLimitingConfig):
            raise TypeError(
                f"request-size-limiting: expected RequestSizeLimitingConfig, got {type(config).__name__}"
            )
        super().__init__(config, instance_id)
        self.config = config
        self._limit = config.limit_bytes

    async def access(self, kong: PDK) -> None:
        request = kong.request
        length = request.get_content_length()
        if length is not None:
            if length > self._limit:
                expect = request.get_header("Expect")
                status = 417 if expect is not None and expect.strip().lower() == "100-continue" else 413
                kong.response.error(status, MSG_TOO_LARGE)
            return
        if self.config.require_content_length:
            kong.response.error(411, MSG_LENGTH_REQUIRED)
        try:
            await request.get_raw_body(self._limit)
        except BodyTooLarge:
            kong.response.error(413, MSG_TOO_LARGE)


__all__ = ["MSG_LENGTH_REQUIRED", "MSG_TOO_LARGE", "Handler"]
