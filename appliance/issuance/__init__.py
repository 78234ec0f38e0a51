"""Issuance: the durable journal and the pipeline authorise -> validate -> build -> sign -> verify -> store."""
