"""The plumbing the four nanochat services share, one small module per concern.

- `app`: `create_app`, the FastAPI factory that wires everything below together.
- `logs`: the one JSON log format and the request-id context variable.
- `errors`: OpenAI's error shape, `APIError`, and the handlers that answer every failure with it.
- `request_context`: the ASGI middleware for the request id, access log, HTTP metrics and 500s.
- `body_limit`: the ASGI middleware that caps request bodies, announced or streamed.
- `auth`: bearer-token checks (read and write) that run before a route reads its body.
- `ops`: `/health`, `/ready` and `/metrics`.
"""
