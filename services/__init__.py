"""The mesh's gRPC services."""
