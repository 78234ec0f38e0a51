"""The SCEP front end (RFC 8894): devices and fixtures that speak SCEP enrol through the one issuance core.

    oids, algorithms   identifiers; which ciphers and digests a label accepts (legacy ones only when configured)
    cms                pure: reading a pkiMessage and its envelope, building CertRep (bytes in, objects out)
    client             the client side, small (tests, the benchmark, a reference for fixture vendors)
    challenges         challenge passwords: made by a supervisor, audited, one-time per device or per work order
    labels, ra         configured labels; the RA credential (an RSA key in the HSM, from the management CA)
    responder          what each request is answered, through IssueService
    server             the HTTP side (aiohttp behind appliance.httplisten.HttpListener)

docs/scep.md describes it for integrators.
"""
