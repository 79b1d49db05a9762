"""CICIoT2023: the columns of both public CSV schemas (v1, v2; plus the `text,label` format) and the
official label taxonomy (34 classes, 8 groups, 2).

`detect_format`, `label_names`, `map_label`, and `normalize_key`, which folds the label spellings of the
releases. Formats, classes and groups: docs/prepare.md; where the data comes from: cic_gpt2/data/SOURCE.md.
"""
from __future__ import annotations

import re

FORMAT_V1, FORMAT_V2, FORMAT_TEXT = "v1", "v2", "text"
FORMATS = (FORMAT_V1, FORMAT_V2, FORMAT_TEXT)

V1_FEATURES: tuple[str, ...] = (
    "flow_duration", "Header_Length", "Protocol Type", "Duration", "Rate", "Srate", "Drate",
    "fin_flag_number", "syn_flag_number", "rst_flag_number", "psh_flag_number", "ack_flag_number",
    "ece_flag_number", "cwr_flag_number", "ack_count", "syn_count", "fin_count", "urg_count", "rst_count",
    "HTTP", "HTTPS", "DNS", "Telnet", "SMTP", "SSH", "IRC", "TCP", "UDP", "DHCP", "ARP", "ICMP", "IPv", "LLC",
    "Tot sum", "Min", "Max", "AVG", "Std", "Tot size", "IAT", "Number", "Magnitue", "Radius", "Covariance",
    "Variance", "Weight",
)
V2_FEATURES: tuple[str, ...] = (
    "Header_Length", "Protocol Type", "Time_To_Live", "Rate",
    "fin_flag_number", "syn_flag_number", "rst_flag_number", "psh_flag_number", "ack_flag_number",
    "ece_flag_number", "cwr_flag_number", "ack_count", "syn_count", "fin_count", "rst_count",
    "HTTP", "HTTPS", "DNS", "Telnet", "SMTP", "SSH", "IRC", "TCP", "UDP", "DHCP", "ARP", "ICMP", "IGMP", "IPv",
    "LLC", "Tot sum", "Min", "Max", "AVG", "Std", "Tot size", "IAT", "Number", "Variance",
)
FEATURES_BY_FORMAT = {FORMAT_V1: V1_FEATURES, FORMAT_V2: V2_FEATURES, FORMAT_TEXT: ()}
LABEL_COLUMN_BY_FORMAT = {FORMAT_V1: "label", FORMAT_V2: "Label", FORMAT_TEXT: "label"}
TEXT_COLUMN = "text"

# Fields that are the fraction of the window's packets with a flag/protocol (0..1; multiples of 0.1 in v2).
FRACTION_FEATURES = frozenset(
    ["fin_flag_number", "syn_flag_number", "rst_flag_number", "psh_flag_number", "ack_flag_number",
     "ece_flag_number", "cwr_flag_number", "HTTP", "HTTPS", "DNS", "Telnet", "SMTP", "SSH", "IRC", "TCP",
     "UDP", "DHCP", "ARP", "ICMP", "IGMP", "IPv", "LLC"]
)

# Official 8-group taxonomy: group -> its classes (canonical spellings of the original release, except that
# the benign class is called "Benign" whatever the file says).
GROUPS: dict[str, tuple[str, ...]] = {
    "Benign": ("Benign",),
    "DDoS": (
        "DDoS-RSTFINFlood", "DDoS-PSHACK_Flood", "DDoS-SYN_Flood", "DDoS-UDP_Flood", "DDoS-TCP_Flood",
        "DDoS-ICMP_Flood", "DDoS-SynonymousIP_Flood", "DDoS-ACK_Fragmentation", "DDoS-UDP_Fragmentation",
        "DDoS-ICMP_Fragmentation", "DDoS-SlowLoris", "DDoS-HTTP_Flood",
    ),
    "DoS": ("DoS-UDP_Flood", "DoS-SYN_Flood", "DoS-TCP_Flood", "DoS-HTTP_Flood"),
    "Mirai": ("Mirai-greeth_flood", "Mirai-greip_flood", "Mirai-udpplain"),
    "Recon": ("Recon-PingSweep", "Recon-OSScan", "Recon-PortScan", "VulnerabilityScan", "Recon-HostDiscovery"),
    "Spoofing": ("DNS_Spoofing", "MITM-ArpSpoofing"),
    "Web": ("BrowserHijacking", "Backdoor_Malware", "XSS", "Uploading_Attack", "SqlInjection", "CommandInjection"),
    "BruteForce": ("DictionaryBruteForce",),
}
LABELS_34: tuple[str, ...] = tuple(c for classes in GROUPS.values() for c in classes)
LABELS_8: tuple[str, ...] = tuple(GROUPS)
LABELS_2: tuple[str, ...] = ("Benign", "Attack")
CLASS_TO_GROUP: dict[str, str] = {c: g for g, classes in GROUPS.items() for c in classes}
CLASSES_CHOICES = ("34", "8", "2", "raw")
assert len(LABELS_34) == 34 and len(set(LABELS_34)) == 34


def normalize_key(name: str) -> str:
    """Case- and punctuation-insensitive key: 'DDOS-ICMP_FLOOD' and 'DDoS-ICMP_Flood' -> 'ddosicmpflood'."""
    return re.sub(r"[^0-9a-z]", "", str(name).lower())


_BENIGN_SPELLINGS = ("Benign", "BenignTraffic", "Benign_Final", "BENIGN")
_CLASS_BY_KEY: dict[str, str] = {normalize_key(c): c for c in LABELS_34}
_CLASS_BY_KEY.update({normalize_key(s): "Benign" for s in _BENIGN_SPELLINGS})
# Mirror spellings seen in the wild that differ by more than case/punctuation.
_CLASS_BY_KEY.update({"ddosrstfinflood": "DDoS-RSTFINFlood", "backdoormalware": "Backdoor_Malware",
                      "mitmarpspoofing": "MITM-ArpSpoofing", "reconpingsweep": "Recon-PingSweep"})
_GROUP_BY_KEY: dict[str, str] = {normalize_key(g): g for g in LABELS_8}
_GROUP_BY_KEY.update({"bruteforce": "BruteForce", "spoofing": "Spoofing", "web": "Web", "webbased": "Web"})


def label_names(classes: str) -> tuple[str, ...]:
    """Class names by id for a fixed taxonomy ('34', '8', '2'); 'raw' labels are only known from the data."""
    if classes == "34":
        return LABELS_34
    if classes == "8":
        return LABELS_8
    if classes == "2":
        return LABELS_2
    raise ValueError(f"label_names: no fixed label set for classes={classes!r}")


def map_label(raw: str, classes: str) -> str | None:
    """Class name of a raw label under a taxonomy, or None when the label is unknown to it.

    Accepts every case/spelling variant of the 34 classes. Group names ('ddos', 'Recon', ...) as written by
    pre-grouped files (e.g. the original script's text CSVs) are accepted for --classes 8 and 2 only: they
    cannot be split back into the 34 classes. 'raw' keeps the label as written (stripped).
    """
    raw = str(raw).strip()
    if classes == "raw":
        return raw or None
    key = normalize_key(raw)
    cls = _CLASS_BY_KEY.get(key)
    group = CLASS_TO_GROUP[cls] if cls is not None else _GROUP_BY_KEY.get(key)
    if classes == "34":
        return cls
    if classes == "8":
        return group
    if classes == "2":
        if group is not None:
            return "Benign" if group == "Benign" else "Attack"
        return {"benign": "Benign", "attack": "Attack"}.get(key)
    raise ValueError(f"map_label: classes must be one of {CLASSES_CHOICES}, got {classes!r}")


def canonical_columns(columns: list[str]) -> dict[str, str]:
    """Map each header column to its canonical CICIoT2023 feature name where it is one (spelling-insensitive)."""
    canon = {normalize_key(f): f for f in V1_FEATURES + V2_FEATURES}
    return {c: canon[normalize_key(c)] for c in columns if normalize_key(c) in canon}


def detect_format(columns: list[str], label_column: str | None = None) -> tuple[str, str | None]:
    """(format, label column or None) from a CSV header. Raises ValueError with what is missing.

    text: has a `text` column; v1: all 46 original features; v2: all 39 merged features. The label column is
    `label_column` if given, else the column named 'label' in any case.
    """
    stripped = [str(c).strip() for c in columns]
    if label_column is not None:
        if label_column not in stripped:
            raise ValueError(f"label column {label_column!r} not in header (columns: {', '.join(stripped)})")
        label = label_column
    else:
        label = next((c for c in stripped if c.lower() == "label"), None)
    if any(c.lower() == TEXT_COLUMN for c in stripped):
        return FORMAT_TEXT, label
    present = set(canonical_columns(stripped).values())
    if present >= set(V1_FEATURES):
        return FORMAT_V1, label
    if present >= set(V2_FEATURES):
        return FORMAT_V2, label
    missing_v1 = [f for f in V1_FEATURES if f not in present]
    missing_v2 = [f for f in V2_FEATURES if f not in present]
    closest, missing = ("v2", missing_v2) if len(missing_v2) <= len(missing_v1) else ("v1", missing_v1)
    raise ValueError(
        f"header matches no known format (closest {closest}, missing {len(missing)} columns: "
        f"{', '.join(missing[:8])}{', ...' if len(missing) > 8 else ''}); expected the 46-feature original, "
        f"the 39-feature merged CICIoT2023 CSV, or text,label"
    )
