"""The ruvdllm node agent: the edge daemon that serves, learns locally and federates.

`ruvdllm-node start|status|init` (node_agent.cli). One long-lived process per node
(node_agent.agent) serves the quantized model over HTTP (OpenAI-compatible, node_agent.http_api)
and the local NodeAgent gRPC service (node_agent.grpc_service), trains federated rounds on local
text (node_agent.trainer), keeps TALoRA's global slots on the coordinator's latest verified
version (node_agent.adapters) and runs flower-supernode (node_agent.supernode), whose ClientApp
(node_agent.client_app) only relays the round to this process.
"""
