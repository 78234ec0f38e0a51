"""PKCS#11 access for Birthline: one thread per process, keys usable by cryptography's builders."""
