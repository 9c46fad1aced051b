"""Protocol buffers and gRPC stubs of ruvdllm (generated from ruvdllm.proto)."""
