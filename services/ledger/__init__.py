"""Ledger: the transparency log of recommendations (contract in protos/)."""
