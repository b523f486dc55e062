"""Other libraries' formats and the peer benchmark: AdapterHub (adapterhub), peft (peftio), and
`bench` with the `adapters` library side by side (bench, peer_bench)."""
