"""The router's list of known request fields matches the installed SGLang."""

from __future__ import annotations

from sglang_eldr.request_validation import validate_body
from sglang_eldr.request_fields import from_installed_sglang, known_fields


def test_shipped_fields_match_the_installed_sglang():
    assert known_fields() == from_installed_sglang(), "run `python -m sglang_eldr.request_fields` and commit"


def test_unknown_fields_are_named_and_ours_are_allowed():
    msg = validate_body("/generate", {"text": "a", "sampling_param": {}})
    assert msg is not None and "'sampling_param'" in msg and "--allow-unknown-fields" in msg
    assert validate_body("/generate", {"text": "a", "sampling_params": {}, "return_eldr_counts": True}) is None
    assert "'temprature'" in validate_body("/v1/completions", {"prompt": "a", "temprature": 0})
    assert validate_body("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "tools": []}) is None
    assert validate_body("/generate", {"text": "a", "whatever": 1}, check_fields=False) is None
