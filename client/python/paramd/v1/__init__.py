"""The `paramd.v1` protocol's messages, generated from
`proto/proto/paramd/v1/paramd.proto` by grpcio-tools and checked in
(`tests/test_stubs.py` regenerates them and fails if they drifted)."""
