"""gRPC side of vlm-servicer: handlers, request decoding and validation, status mapping."""
