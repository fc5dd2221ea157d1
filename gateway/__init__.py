"""HTTP gateway: HTTP/JSON to gRPC, driven by the google.api.http annotations in protos/."""
