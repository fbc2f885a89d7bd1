"""A decoder whose port another process takes between choosing and binding (the servers of a
cluster open many ports while they start) is started again on a new port, at once, and the cluster
serves."""

from __future__ import annotations

import socket
from dataclasses import dataclass

import requests

from sglang_eldr.launch_cluster import Cluster
from tests.cluster.conftest import HOST, MODEL


@dataclass
class DecoderPortTaken(Cluster):
    """Hands the decoder a port held by a listening socket; every later port is free."""
    taken: int = 0
    calls: int = 0

    def free_port(self, host: str) -> int:
        self.calls += 1
        # the prefill's bootstrap and counts ports, its HTTP port, then the decoder's HTTP port
        return self.taken if self.calls == 4 else super().free_port(host)


def test_decoder_started_again_on_a_new_port(tmp_path):
    with socket.socket() as held:
        held.bind((HOST, 0))
        held.listen()
        taken = held.getsockname()[1]
        with DecoderPortTaken(model_path=str(MODEL), num_prefill=1, num_decode=1, host=HOST, policy="jsq",
                              max_total_tokens=8192, log_dir=tmp_path, taken=taken) as c:
            (decoder,) = c.decoders
            assert decoder.port != taken and decoder.running()
            assert "could not bind" not in decoder.log_text()
            router = c.start_router()
            r = requests.post(router.url + "/generate", json={"text": "def add(a, b):", "sampling_params": {
                "max_new_tokens": 4, "temperature": 0.0}}, timeout=120)
            assert r.status_code == 200, r.text
            assert r.json()["text"]
