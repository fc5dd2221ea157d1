"""The client SDK: keys stay here, interest vectors are encrypted here, scores decrypted here."""
