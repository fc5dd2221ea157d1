"""The mesh's CKKS parameter set, slot layout and ciphertext (de)serialization."""
