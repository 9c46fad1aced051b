"""The ruvdllm coordinator: Flower SuperLink + ServerApp strategy, state store, gRPC service.

`ruvdllm-coordinator start|enroll|status|init-tls` (coordinator.cli). The strategy
(coordinator.strategy) runs inside Flower's SuperExec process and reaches the state only
through the store's files (coordinator.store); the daemon (coordinator.launch) runs the
SuperLink as a subprocess and the gRPC `Coordinator` service (coordinator.service) in-process.
"""
