"""Schema detection and the official CICIoT2023 taxonomy, on the real bundled headers and labels."""
import pandas as pd
import pytest

from cic_gpt2 import schema

EXPECTED_GROUP = {
    **{c: "DDoS" for c in ["DDoS-RSTFINFlood", "DDoS-PSHACK_Flood", "DDoS-SYN_Flood", "DDoS-UDP_Flood",
                           "DDoS-TCP_Flood", "DDoS-ICMP_Flood", "DDoS-SynonymousIP_Flood", "DDoS-ACK_Fragmentation",
                           "DDoS-UDP_Fragmentation", "DDoS-ICMP_Fragmentation", "DDoS-SlowLoris", "DDoS-HTTP_Flood"]},
    **{c: "DoS" for c in ["DoS-UDP_Flood", "DoS-SYN_Flood", "DoS-TCP_Flood", "DoS-HTTP_Flood"]},
    **{c: "Mirai" for c in ["Mirai-greeth_flood", "Mirai-greip_flood", "Mirai-udpplain"]},
    **{c: "Recon" for c in ["Recon-PingSweep", "Recon-OSScan", "Recon-PortScan", "VulnerabilityScan",
                            "Recon-HostDiscovery"]},
    **{c: "Spoofing" for c in ["MITM-ArpSpoofing", "DNS_Spoofing"]},
    **{c: "Web" for c in ["BrowserHijacking", "Backdoor_Malware", "XSS", "Uploading_Attack", "SqlInjection",
                          "CommandInjection"]},
    "DictionaryBruteForce": "BruteForce",
    "BenignTraffic": "Benign",
}


def test_taxonomy_has_34_classes_in_8_official_groups():
    assert len(EXPECTED_GROUP) == 34
    assert schema.LABELS_8 == ("Benign", "DDoS", "DoS", "Mirai", "Recon", "Spoofing", "Web", "BruteForce")
    for raw, group in EXPECTED_GROUP.items():
        assert schema.map_label(raw, "8") == group, raw
        assert schema.map_label(raw, "2") == ("Benign" if group == "Benign" else "Attack"), raw
        assert schema.map_label(raw, "34") in schema.LABELS_34
    assert sorted(schema.map_label(r, "34") for r in EXPECTED_GROUP) == sorted(schema.LABELS_34)


@pytest.mark.parametrize("variant,expected", [
    ("BenignTraffic", "Benign"), ("Benign_Final", "Benign"), ("BENIGN", "Benign"), (" benign ", "Benign"),
    ("DDOS-ICMP_FLOOD", "DDoS-ICMP_Flood"), ("ddos-icmp_flood", "DDoS-ICMP_Flood"),
    ("DDOS-RSTFIN_FLOOD", "DDoS-RSTFINFlood"), ("MITM-ARPSPOOFING", "MITM-ArpSpoofing"),
    ("BACKDOOR_MALWARE", "Backdoor_Malware"), ("RECON-PINGSWEEP", "Recon-PingSweep"),
    ("VULNERABILITYSCAN", "VulnerabilityScan"), ("DICTIONARYBRUTEFORCE", "DictionaryBruteForce"),
])
def test_label_spelling_variants_normalize(variant, expected):
    assert schema.map_label(variant, "34") == expected


def test_every_class_in_upper_and_lower_case_maps_to_itself():
    for c in schema.LABELS_34:
        assert schema.map_label(c.upper(), "34") == c
        assert schema.map_label(c.lower(), "34") == c


def test_group_names_only_for_grouped_taxonomies_and_unknowns_are_none():
    assert schema.map_label("ddos", "8") == "DDoS" and schema.map_label("recon", "2") == "Attack"
    assert schema.map_label("ddos", "34") is None  # a group cannot be split back into classes
    assert schema.map_label("Totally-New-Attack", "8") is None
    assert schema.map_label("Totally-New-Attack", "raw") == "Totally-New-Attack"


def test_real_sample_labels_are_all_known(sample_v1, sample_v2):
    for path, col in ((sample_v1, "label"), (sample_v2, "Label")):
        labels = pd.read_csv(path)[col].unique()
        assert all(schema.map_label(v, "34") is not None for v in labels), labels


def test_detect_format_on_real_headers(sample_v1, sample_v2):
    v1 = list(pd.read_csv(sample_v1, nrows=0).columns)
    v2 = list(pd.read_csv(sample_v2, nrows=0).columns)
    assert schema.detect_format(v1) == ("v1", "label")
    assert schema.detect_format(v2) == ("v2", "Label")
    assert schema.detect_format(["text", "label"]) == ("text", "label")
    assert schema.detect_format(v1, label_column="final_label") == ("v1", "final_label")
    assert len(schema.V1_FEATURES) == 46 and len(schema.V2_FEATURES) == 39
    assert set(schema.V1_FEATURES) - set(schema.V2_FEATURES) == {
        "flow_duration", "Duration", "Srate", "Drate", "urg_count", "Magnitue", "Radius", "Covariance", "Weight"}


def test_detect_format_names_missing_columns(sample_v2):
    v2 = [c for c in pd.read_csv(sample_v2, nrows=0).columns if c not in ("IAT", "Rate")]
    with pytest.raises(ValueError, match="missing 2 columns: Rate, IAT"):
        schema.detect_format(v2)
    with pytest.raises(ValueError, match="label column 'y' not in header"):
        schema.detect_format(["text", "label"], label_column="y")


def test_header_spelling_is_normalized():
    assert schema.canonical_columns(["protocol_type", " Tot Sum", "header-length"]) == {
        "protocol_type": "Protocol Type", " Tot Sum": "Tot sum", "header-length": "Header_Length"}
