"""Key service: clients' public HE keys and the mesh's signing keys (contract in protos/)."""
