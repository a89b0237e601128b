"""Kubernetes value formats checked the way the API server checks them: quantities, DNS names, label keys.

The regular expressions are the ones the CRD's schema and CEL rules use (RE2 and Python `re` agree on them), so
`gprl config` and the API server give the same verdict. Quantities follow apimachinery's grammar
(`resource.Quantity`): a signed decimal number, then a binary (Ki..Ei), decimal (n, u, m, k, M..E) or exponent
(e3, E-2) suffix.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

__all__ = ["DNS_LABEL", "DNS_SUBDOMAIN", "LABEL_KEY", "LABEL_VALUE", "parse_quantity", "check_label_key"]

DNS_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"  # DNS-1035 label (names of Services, and so of runs)
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"  # Secrets, claims, classes
LABEL_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
LABEL_KEY = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?" + LABEL_NAME + "$"
LABEL_VALUE = r"^(" + LABEL_NAME + ")?$"

_QUANTITY = re.compile(r"^([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))((?:[KMGTPE]i)|[numkMGTPE]|[eE][+-]?[0-9]+)?$")
_SUFFIX = {
    "": Decimal(1), "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "k": Decimal("1e3"),
    "M": Decimal("1e6"), "G": Decimal("1e9"), "T": Decimal("1e12"), "P": Decimal("1e15"), "E": Decimal("1e18"),
    **{f"{p}i": Decimal(1024) ** (i + 1) for i, p in enumerate("KMGTPE")},
}


def parse_quantity(text: str) -> Decimal | None:
    """`"500m"` -> Decimal("0.5"), `"16Gi"` -> 17179869184; None when `text` is not a quantity."""
    m = _QUANTITY.match(text.strip()) if text == text.strip() else None
    if m is None:
        return None
    number, suffix = m.group(1), m.group(2) or ""
    try:
        if suffix[:1] in ("e", "E"):
            return Decimal(number) * (Decimal(10) ** int(suffix[1:]))
        return Decimal(number) * _SUFFIX[suffix]
    except (InvalidOperation, KeyError, OverflowError):
        return None


def check_label_key(key: str) -> None:
    """ValueError naming `key` unless it is a label key: `[prefix/]name`, the prefix a DNS subdomain of at most
    253 characters, the name at most 63 characters."""
    if not re.match(LABEL_KEY, key) or len(key.split("/")[0]) > 253:
        raise ValueError(f"{key!r} is not a label key ([prefix/]name: name up to 63 characters of letters, digits, "
                         "'-', '_', '.', starting and ending with a letter or digit; prefix a DNS subdomain)")
