"""The EST front end (RFC 7030, with RFC 8951's clarifications): fixtures and devices that speak EST enrol
through the one issuance core.

    wire, csr, csrattrs    pure: EST payloads, the CSR an EST client sends, the csrattrs answer
    labels, auth, binding  per label: its configuration, who the client is, the TLS channel binding
    keygen                 serverkeygen's key (software; kept nowhere)
    responder              the operations over IssueService
    server                 the HTTP side, served over TLS only through appliance.httplisten
    errors                 refusals as HTTP status and reason

Nothing is imported here: the daemon imports EST only when [est] listen is set (tests/appliance/test_daemon_imports.py).
"""
