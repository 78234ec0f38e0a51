"""The identifiers SCEP messages carry (RFC 8894 3.2.1, RFC 5652, RFC 2985)."""

from __future__ import annotations

import enum

# CMS content types (RFC 5652)
ID_DATA = "1.2.840.113549.1.7.1"
ID_SIGNED_DATA = "1.2.840.113549.1.7.2"
ID_ENVELOPED_DATA = "1.2.840.113549.1.7.3"

# CMS signed attributes (RFC 5652 11, PKCS #9; challengePassword is cryptography's AttributeOID)
CONTENT_TYPE = "1.2.840.113549.1.9.3"
MESSAGE_DIGEST = "1.2.840.113549.1.9.4"
SIGNING_TIME = "1.2.840.113549.1.9.5"

# SCEP signed attributes (RFC 8894 3.2.1, the VeriSign arc)
MESSAGE_TYPE = "2.16.840.1.113733.1.9.2"
PKI_STATUS = "2.16.840.1.113733.1.9.3"
FAIL_INFO = "2.16.840.1.113733.1.9.4"
SENDER_NONCE = "2.16.840.1.113733.1.9.5"
RECIPIENT_NONCE = "2.16.840.1.113733.1.9.6"
TRANSACTION_ID = "2.16.840.1.113733.1.9.7"
FAIL_INFO_TEXT = "1.3.6.1.5.5.7.24.1"  # id-scep-failInfoText (RFC 8894 3.2.1.4.5)

RSA_ENCRYPTION = "1.2.840.113549.1.1.1"


class MessageType(enum.IntEnum):
    """RFC 8894 3.2.1.2; on the wire as the PrintableString of the number."""

    CERT_REP = 3
    RENEWAL_REQ = 17
    PKCS_REQ = 19
    CERT_POLL = 20
    GET_CERT = 21
    GET_CRL = 22


class PkiStatus(enum.IntEnum):
    SUCCESS = 0
    FAILURE = 2
    PENDING = 3
